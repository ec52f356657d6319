"""XLA flags of every test process and of the processes the tests start (no jax import here:
conftest.py sets them before jax starts).

--xla_backend_optimization_level=0 runs LLVM without its optimisation passes. The suite's
programs are tiny and each is compiled once or twice, so compiling is most of its time; this
compiles the sharded U-Net programs ~2.5x faster (tests/integration/test_images_training.py's fixture:
237 s -> 87 s on 2 loaded cores) for slower-running code. It moves float results by ulps, so
a process a test compares with bit-for-bit (a SIGKILLed run, a second host) must use the same
flags: start it with ``for_devices(n)``. The product keeps XLA's defaults.
"""

OPTIMISATION = "--xla_backend_optimization_level=0"


def for_devices(n: int) -> str:
  """XLA_FLAGS for a process with ``n`` fake CPU devices, compiled as the tests compile."""
  return f"--xla_force_host_platform_device_count={n} {OPTIMISATION}"
