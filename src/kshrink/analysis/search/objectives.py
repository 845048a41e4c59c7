"""What `search` makes smaller: an objective is a small config (its options checked where it
is made, as a technique's are) that says its unit, which techniques it searches and how it
builds the search space for a model.

```python
kshrink.search(model, data, objective=Latency(runtime="onnx", channels="per_layer"))
kshrink.search(model, data, objective="size")  # a name: the objective with its defaults
```
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from kshrink.analysis.search.spaces import LatencySpace, MacsSpace, MemorySpace, SizeSpace, Space
from kshrink.core.options import MAX_BATCH, Int, OneOf, Options, option
from kshrink.core.technique import handler_for, registered_techniques
from kshrink.deploy import check_runtime
from kshrink.errors import KshrinkError

CHANNEL_SCOPES = ("uniform", "per_layer")


class Objective(Options):
    """Base of the search objectives."""

    unit: ClassVar[str] = ""
    default_techniques: ClassVar[tuple[str, ...]] = ()  # searched when none are named
    runtime: ClassVar[str] = "keras"  # where candidates are timed (`Latency`)

    def allowed(self) -> tuple[str, ...]:
        """The names of the techniques this objective can search: the registered ones whose
        handlers offer its levels."""
        return tuple(cls.name for cls in registered_techniques() if self.offers(handler_for(cls)))

    def offers(self, handler) -> bool:
        """Whether a technique's handler offers this objective's levels."""
        raise NotImplementedError

    def space(self, model, templates: dict, x_held, trains: bool) -> Space:
        """The search space of `model` with `templates` (technique name -> config)."""
        raise NotImplementedError

    def check_templates(self, templates: dict) -> None:
        """Refuses techniques whose options this objective cannot search."""


@dataclasses.dataclass(frozen=True)
class Size(Objective):
    """Bytes of the compact `.kshrink` file, searched over per-layer sparsity (`prune`, 0 to
    98%: a technique that thins) and per-layer weight encoding: float, or a level of every
    technique that offers size levels (`cluster`: 256 to 4 shared values; `quantize`: int8,
    int4; a plugin's)."""

    name = "size"
    unit = "bytes"
    default_techniques = ("prune", "cluster")

    def offers(self, handler) -> bool:
        return handler.offers_size_levels()

    def space(self, model, templates, x_held, trains):
        return SizeSpace(model, templates, trains=trains)


@dataclasses.dataclass(frozen=True)
class Memory(Objective):
    """Bytes of the weights held in memory, searched over float/int8/int4 per layer (int4 in
    groups of 128 inputs; quantization-aware training when the search fine-tunes), or the
    levels of any technique that prices them in memory (`Handler.memory_bits`)."""

    name = "memory"
    unit = "bytes"
    default_techniques = ("quantize",)

    def offers(self, handler) -> bool:
        return handler.offers_memory_levels()

    def space(self, model, templates, x_held, trains):
        return MemorySpace(model, templates)


@dataclasses.dataclass(frozen=True)
class _Structural(Objective):
    """Removing residual blocks (`depth_prune`) and a share of the channels
    (`structured_prune`, 0 to 75%), BatchNorm folded."""

    default_techniques = ("depth_prune", "structured_prune")

    channels: str = option("uniform", "structured_prune's ratio: uniform or per_layer",
                           OneOf(CHANNEL_SCOPES))

    def offers(self, handler) -> bool:
        return handler.offers_structure_levels()

    def check_templates(self, templates):
        if self.channels != "uniform" and "structured_prune" not in templates:
            raise KshrinkError(f"search: channels={self.channels!r} sets how structured_prune's "
                               f"ratio is searched, and objective {self.name!r} with techniques "
                               f"{', '.join(templates)} removes no channels")


@dataclasses.dataclass(frozen=True)
class Macs(_Structural):
    """Multiply-accumulates per example (`kshrink.measure.macs`: exact, the same on every
    machine), searched over removing each residual block (`depth_prune`) and a share of the
    channels (`structured_prune`, 0 to 75%), BatchNorm folded.

    Args:
        channels: `structured_prune`'s ratio: `"uniform"`, one for every layer, or
            `"per_layer"`, one per set of layers whose channels are tied (e.g. by residual
            Adds): more probes, a finer choice.
    """

    name = "macs"
    unit = "MACs"

    def space(self, model, templates, x_held, trains):
        return MacsSpace(model, templates, per_layer=self.channels == "per_layer")


def _runtime(owner: str, key: str, runtime):
    check_runtime(owner, runtime)
    return runtime


@dataclasses.dataclass(frozen=True)
class Latency(_Structural):
    """The median time of a forward pass on this machine, searched over removing each
    residual block (`depth_prune`) and a share of the channels (`structured_prune`, 0 to
    75%), BatchNorm folded: what each level saves is timed once on the model its probe made
    (NetAdapt's table), and every candidate is timed whole.

    Args:
        channels: as for `Macs`.
        batch_size: the batch size the forward pass is timed at.
        runtime: where it is timed: `"keras"` (`predict_on_batch`), or the runtime the model
            will be deployed to, `"litert"` or `"onnx"`: every probe and candidate is then
            exported (float) and timed there (`kshrink.deploy`). Keras adds a fixed cost per
            call (about 0.5 ms on 2 cores) that a deployment runtime does not, and runtimes
            time channel counts differently.
    """

    name = "latency"
    unit = "us"

    batch_size: int = option(1, "the batch size a forward pass is timed at",
                             Int(low=1, high=MAX_BATCH))
    runtime: str = option("keras", "keras, litert or onnx", _runtime)

    def space(self, model, templates, x_held, trains):
        return LatencySpace(model, templates, x_held, self.batch_size, self.runtime,
                            per_layer=self.channels == "per_layer")


OBJECTIVES = {cls.name: cls for cls in (Size, Memory, Latency, Macs)}


def objective_from(objective, latency_batch_size: int | None = None,
                   latency_runtime: str | None = None, channels: str | None = None
                   ) -> Objective:
    """`objective` as an `Objective`: one already, or a name with the options the keyword
    shorthands of `search` give it (`latency_batch_size`, `latency_runtime`, `channels`)."""
    given = {key: value for key, value in (("batch_size", latency_batch_size),
                                           ("runtime", latency_runtime),
                                           ("channels", channels)) if value is not None}
    if isinstance(objective, Objective):
        if given:
            raise KshrinkError(f"search: the objective {objective.name!r} is a config; set "
                               f"{', '.join(given)} on it, not as keywords of search")
        return objective
    if not isinstance(objective, str) or objective not in OBJECTIVES:
        raise KshrinkError(f"search: objective must be one of {', '.join(OBJECTIVES)} or an "
                           f"objective config (kshrink.Latency(...)). "
                           f"Received: objective={objective!r}")
    cls = OBJECTIVES[objective]
    keyword = {"batch_size": "latency_batch_size", "runtime": "latency_runtime",
               "channels": "channels"}
    for key, value in given.items():
        if key not in {field.name for field in dataclasses.fields(cls)}:
            what = ("sets how structured_prune's ratio is searched (latency, macs); objective "
                    f"{objective!r} removes no channels" if key == "channels" else
                    f"sets how latency is timed; objective {objective!r} is not timed")
            raise KshrinkError(f"search: {keyword[key]} {what}. Received: "
                               f"{keyword[key]}={value!r}")
    return cls(**given)
