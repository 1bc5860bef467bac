r"""The 1:1 rule's stable band for the spectral balance ratio $\rho = \lVert W_\text{mlp}\rVert_2/\lVert W_\text{attn}\rVert_2$.

A layer is "balanced" when $0.5 \le \rho \le 2$ (Gamaleldin 2025). The one definition: the checkpoint
CLI, the training guard and telemetry, the sweep plots and the figures import it from here.
"""

#: (lower, upper) edges of the rule's stable band for rho.
BAND = (0.5, 2.0)
