"""Butcher tableaus of the explicit Runge-Kutta methods the samplers offer.

Each is (c, a, b): stage times c_j (fractions of the step), stage weights a[j][l] (l < j) and
final weights b_j. Stage j evaluates the model at x + h sum_l a[j][l] k_l and time t + c_j h;
the step is x + h sum_j b_j k_j. "rk4" is the classic method; "rk4_38" is Kutta's 3/8 rule,
what torchdiffeq (and flow_matching's ODESolver through it) runs for method "rk4".
"""
TABLEAUS = {
    "euler": ((0.0,), ((),), (1.0,)),
    "midpoint": ((0.0, 0.5), ((), (0.5,)), (0.0, 1.0)),
    "heun": ((0.0, 1.0), ((), (1.0,)), (0.5, 0.5)),
    "rk4": ((0.0, 0.5, 0.5, 1.0), ((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)),
            (1 / 6, 1 / 3, 1 / 3, 1 / 6)),
    "rk4_38": ((0.0, 1 / 3, 2 / 3, 1.0), ((), (1 / 3,), (-1 / 3, 1.0), (1.0, -1.0, 1.0)),
               (1 / 8, 3 / 8, 3 / 8, 1 / 8)),
}
