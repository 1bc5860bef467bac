"""Array shape aliases used across meanfield (jaxtyping).

`n` tokens, `d` token dimension, `k` query/key dimension, `h` MLP hidden width,
`L` layers of a piecewise-constant depth schedule, `T` saved times.
"""

from jaxtyping import Array, Float, Int, Bool

Scalar = Float[Array, ""]
Tokens = Float[Array, "n d"]
Mean = Float[Array, "d"]
Cov = Float[Array, "d d"]
Factor = Float[Array, "d r"]
Times = Float[Array, "T"]
Trajectory = Float[Array, "T n d"]

__all__ = ["Array", "Float", "Int", "Bool", "Scalar", "Tokens", "Mean", "Cov", "Factor", "Times", "Trajectory"]
