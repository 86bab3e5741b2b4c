"""The registry of experiment kinds: name -> `Kind`, read by `attnlab run`, `figures` and `list`."""

from attnlab.experiments import (
    backend_check,
    calibration,
    critical_scaling,
    distillation,
    extrapolation,
    fading_synthetic,
    length_generalization,
    mqar,
    needle,
    sparsity,
    throughput,
)
from attnlab.experiments.kind import Kind

KINDS: dict[str, Kind] = {
    module.KIND.name: module.KIND
    for module in (
        fading_synthetic,
        critical_scaling,
        sparsity,
        throughput,
        backend_check,
        length_generalization,
        needle,
        calibration,
        distillation,
        mqar,
        extrapolation,
    )
}
