"""A district-heating plant as an FMI 2.0 co-simulation slave (built with ``pythonfmu build``).

Written independently of ``parallelcity.models.district_heating`` (plain Python, RK4 with
60 s substeps) so the FMU rig is a different implementation of the same physics.  Variable
names deliberately differ from the model's signal names: the scenario maps them.
"""

import math

from pythonfmu import Fmi2Causality, Fmi2Slave, Fmi2Variability, Real

CP = 4.186
TUNABLE = Fmi2Variability.tunable
BUILDINGS = {
    # name: (ua kW/K, capacity MJ/K, ua_hx kW/K, solar aperture m2, initial C)
    "apartment": (2.5, 150.0, 15.0, 8.0, 20.5),
    "office": (1.5, 60.0, 10.0, 12.0, 18.0),
    "school": (2.0, 100.0, 12.0, 10.0, 17.0),
}


class DistrictHeating(Fmi2Slave):
    author = "parallelcity tests"
    description = "Heat plant and three RC buildings"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.T_set = 70.0
        self.T_out = 0.0
        self.I_sol = 0.0
        self.tau_s = 1200.0
        self.T_supply = 70.0
        self.T_supply_0 = 70.0
        self.register_variable(Real("T_set", causality=Fmi2Causality.input))
        self.register_variable(Real("T_out", causality=Fmi2Causality.input))
        self.register_variable(Real("I_sol", causality=Fmi2Causality.input))
        self.register_variable(Real("T_supply", causality=Fmi2Causality.output))
        for name in ("tau_s", "T_supply_0"):
            self.register_variable(
                Real(name, causality=Fmi2Causality.parameter, variability=TUNABLE)
            )
        for b, (ua, c, hx, ap, t0) in BUILDINGS.items():
            for key, value in (
                (f"m_{b}", 0.3),
                (f"Q_int_{b}", 0.0),
                (f"T_{b}", t0),
                (f"T_{b}_0", t0),
                (f"ua_{b}", ua),
                (f"c_{b}", c),
                (f"hx_{b}", hx),
                (f"ap_{b}", ap),
            ):
                setattr(self, key, value)
            for key in (f"m_{b}", f"Q_int_{b}"):
                self.register_variable(Real(key, causality=Fmi2Causality.input))
            self.register_variable(Real(f"T_{b}", causality=Fmi2Causality.output))
            for key in (f"T_{b}_0", f"ua_{b}", f"c_{b}", f"hx_{b}", f"ap_{b}"):
                self.register_variable(
                    Real(key, causality=Fmi2Causality.parameter, variability=TUNABLE)
                )

    def exit_initialization_mode(self):
        self.T_supply = self.T_supply_0
        for b in BUILDINGS:
            setattr(self, f"T_{b}", getattr(self, f"T_{b}_0"))

    def _rates(self, x):
        ts = x["supply"]
        out = {"supply": (self.T_set - ts) / self.tau_s}
        for b in BUILDINGS:
            m = max(getattr(self, f"m_{b}"), 1e-6)
            mcp = m * CP
            q = mcp * (ts - x[b]) * (1.0 - math.exp(-getattr(self, f"hx_{b}") / mcp))
            gains = (
                q
                - getattr(self, f"ua_{b}") * (x[b] - self.T_out)
                + getattr(self, f"ap_{b}") * self.I_sol / 1000.0
                + getattr(self, f"Q_int_{b}")
            )
            out[b] = gains / (getattr(self, f"c_{b}") * 1000.0)
        return out

    def do_step(self, current_time, step_size):
        x = {b: getattr(self, f"T_{b}") for b in BUILDINGS}
        x["supply"] = self.T_supply
        n = max(1, math.ceil(step_size / 60.0 - 1e-9))
        h = step_size / n
        for _ in range(n):
            k1 = self._rates(x)
            k2 = self._rates({k: x[k] + h / 2 * k1[k] for k in x})
            k3 = self._rates({k: x[k] + h / 2 * k2[k] for k in x})
            k4 = self._rates({k: x[k] + h * k3[k] for k in x})
            x = {k: x[k] + h / 6 * (k1[k] + 2 * k2[k] + 2 * k3[k] + k4[k]) for k in x}
        self.T_supply = x["supply"]
        for b in BUILDINGS:
            setattr(self, f"T_{b}", x[b])
        return True
