"""Peak memory of one throughput memory point, measured in this fresh process.

    python -m attnlab.experiments.throughput_memory < request.json

The request is {"config": <a throughput Config as JSON>, "point": {"case", "implementation", "n",
"mode", ...}}; the config is checked and rebuilt exactly as from a TOML file. The process makes
the point's inputs, then compiles and runs the point's program once (the same program the timing
points time, `attnlab.experiments.throughput.compile_program`), and prints one JSON line:

  rss_before_bytes     resident memory after the inputs were made, before compiling (bytes);
  peak_rss_bytes       the process's high-water mark of resident memory (VmHWM), over importing,
                       compiling and the one call; it never goes down, hence one process per point;
  device_peak_bytes    the device allocator's peak bytes in use where the device reports it (GPU),
                       else null;
  compile_seconds, first_call_seconds.

The throughput kind runs this once per memory point (Config.memory_lengths).
"""

from __future__ import annotations

import json
import resource
import sys
import time
from typing import Any

import jax

from attnlab.experiments import throughput
from attnlab.experiments.config import ConfigError, parse_dataclass


def rss_bytes() -> int:
    """The resident memory of this process now (bytes), from /proc/self/statm."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> int:
    """The high-water mark of this process's resident memory (bytes): VmHWM of /proc/self/status.

    Not getrusage's ru_maxrss: Linux carries that over from the parent through fork and exec, so
    a child of a large process would report the parent's size.
    """
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    raise OSError("/proc/self/status has no VmHWM line")


def device_peak_bytes(device: Any) -> int | None:
    """The device allocator's peak bytes in use, or None where the device reports none (CPU)."""
    try:
        stats = device.memory_stats()
    except Exception:  # CPU devices may not implement it
        return None
    return None if not stats else stats.get("peak_bytes_in_use")


def config_from_json(table: dict[str, Any]) -> throughput.Config:
    """A throughput Config from its JSON form (`attnlab.experiments.config.to_json`), checked."""
    problems: list[str] = []
    config = parse_dataclass(throughput.Config, table, "throughput memory request", problems)
    if problems:
        raise ConfigError(problems)
    return config


def measure(config: throughput.Config, point: dict[str, Any]) -> dict[str, Any]:
    """Compile and run the point's program once; the memory and seconds it took (see the module docstring)."""
    case, implementation, n, mode = point["case"], point["implementation"], int(point["n"]), point["mode"]
    args = jax.block_until_ready(throughput.inputs(config, n))
    before = rss_bytes()
    compiled, compile_seconds = throughput.compile_program(config, case, implementation, n, mode, args)
    started = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    first_call_seconds = time.perf_counter() - started
    peak = peak_rss_bytes()
    return {
        "rss_before_bytes": before,
        "peak_rss_bytes": peak,
        "device_peak_bytes": device_peak_bytes(args[0].devices().pop()),
        "compile_seconds": round(compile_seconds, 6),
        "first_call_seconds": round(first_call_seconds, 6),
    }


def main() -> int:
    # The peak must count compiling the program, never a read of a persistent compilation cache.
    jax.config.update("jax_enable_compilation_cache", False)
    request = json.loads(sys.stdin.read())
    print(json.dumps(measure(config_from_json(request["config"]), request["point"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
