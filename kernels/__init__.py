"""Per-sample gradient kernels: Triton GPU kernels, each beside its pure-torch reference."""

__all__: list[str] = []
