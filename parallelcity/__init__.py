"""parallelcity: close the loop between field equipment and its digital twin, safely."""

__version__ = "0.1.0"
