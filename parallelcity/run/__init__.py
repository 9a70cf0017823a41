"""Running a scenario: the loop's I/O shell and how a run begins and ends."""
