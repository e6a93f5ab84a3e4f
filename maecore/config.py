"""A run's typed configuration: built once from the command line, never changed afterwards.

Every task package has a ``config.py`` with a frozen dataclass that extends :class:`RunConfig` (the engine's flags,
:func:`maecore.cli.add_engine_args`) by the task's own flags, and ``parse_config(argv)``: parse, check, and resolve
every value derived from the flags (the lr from the base lr and the effective batch, a protocol's defaults…) before
the config is frozen.  What a run learns later, from its data (class names, category ids, epochs from a dataset's
size) or from what it built, is not written into the config: it is a small record of its own, laid over the config's
flags where checkpoints store their ``args`` (:meth:`RunConfig.saved_args`) and where the engine is told
(:meth:`RunConfig.engine`).

No argparse here: a config is built from the parsed namespace's values (:meth:`RunConfig.from_namespace`), and the
engine sees an :class:`~maecore.engine.config.EngineConfig` and a plain dict.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:  # the engine imports torch: only once a run is configured
    from maecore.engine.config import EngineConfig

C = TypeVar("C", bound="RunConfig")

Learned = Mapping[str, Any] | object  # a mapping, or a dataclass instance (its fields)


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """The engine's flags, as :func:`maecore.cli.add_engine_args` defines them (same names, same order)."""

    output_dir: str
    epochs: int
    batch_size: int  # per process
    accum_iter: int
    num_workers: int
    pin_mem: bool
    seed: int
    amp: str  # auto | bf16 | fp16 | none
    attn: str  # auto | fused | explicit
    clip_grad: float | None
    log_every: int
    save_every_steps: int
    keep_every: int
    eval_every: int
    max_steps: int
    resume: str
    overwrite: bool
    resume_override: str
    progress: bool
    compile: bool
    device: str  # auto | cpu | cuda
    dist_timeout: float
    loggers: list[str]  # jsonl | tensorboard | wandb (maecore.engine.loggers)
    # not a flag: the dests of the flags written on the command line, whatever their values (a checkpoint's saved
    # model flags do not replace these: ``--eval --resume``)
    given: frozenset[str] = field(default=frozenset(), repr=False)

    @classmethod
    def from_namespace(cls: type[C], ns: Any, given: frozenset[str] = frozenset(), **resolved: Any) -> C:
        """The config of a parsed namespace (``vars(ns)``: one field per flag, no more, no fewer), with the
        ``resolved`` values in place of the parsed ones."""
        values = dict(vars(ns))
        names = flag_names(cls)
        if set(values) != set(names):
            missing, extra = sorted(set(names) - set(values)), sorted(set(values) - set(names))
            raise TypeError(f"{cls.__name__} does not match its parser: fields without a flag {missing}, "
                            f"flags without a field {extra}")
        values.update(resolved)
        return cls(given=frozenset(given), **values)

    def args(self) -> dict[str, Any]:
        """The flags and their values in the parser's order: the task's, then the engine's (every task's parser
        adds the engine's flags last), as ``vars()`` of the parsed namespace lists them."""
        return {name: getattr(self, name) for name in flag_names(type(self))}

    def saved_args(self, *learned: Learned) -> dict[str, Any]:
        """What a checkpoint stores as its ``args`` (and the run folder as ``args.json``): the flags with the
        ``learned`` values laid over them, a known key keeping its place, a new one appended
        (:func:`maecore.engine.dump_args`: plain values)."""
        from maecore.engine.config import dump_args  # the engine imports torch: only once a run is configured

        return dump_args(overlay(self.args(), *learned))

    def engine(self, *learned: Learned, **overrides: Any) -> EngineConfig:
        """The engine's configuration: the engine's flags with the ``learned`` values laid over them (the epochs a
        dataset's size gives…), then ``overrides`` (what the task tells the engine beyond its flags: ``best_key``…)."""
        return engine_config(overlay(self.args(), *learned), **overrides)

    def effective_batch(self, world_size: int | None = None) -> int:
        """Images per optimizer step: per-process batch x accumulation x processes (``None``: this job's,
        :func:`maecore.distributed.launched_world_size`)."""
        if world_size is None:
            from maecore.distributed import launched_world_size  # imports torch: only once a run is configured

            world_size = launched_world_size()
        return self.batch_size * self.accum_iter * world_size


def flag_names(cls: type[RunConfig]) -> list[str]:
    """The flag fields of a config class in the parser's order: the task's own, then the engine's."""
    engine = [f.name for f in fields(RunConfig) if f.name != "given"]
    own = [f.name for f in fields(cls) if f.name not in engine and f.name != "given"]
    return own + engine


def engine_config(values: Mapping[str, Any], **overrides: Any) -> EngineConfig:
    """The :class:`~maecore.engine.config.EngineConfig` of the engine's names among ``values``, then ``overrides``."""
    from maecore.engine.config import EngineConfig  # the engine imports torch: only once a run is configured

    names = {f.name for f in fields(EngineConfig)}
    return EngineConfig(**{**{k: v for k, v in values.items() if k in names}, **overrides})


def overlay(values: Mapping[str, Any], *learned: Learned) -> dict[str, Any]:
    """``values`` with each of ``learned`` (a mapping or a dataclass instance) laid over it in turn."""
    out = dict(values)
    for record in learned:
        out.update(record if isinstance(record, Mapping) else
                   {f.name: getattr(record, f.name) for f in fields(record)})
    return out


__all__ = ["RunConfig", "engine_config", "flag_names", "overlay"]
