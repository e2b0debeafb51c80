"""Any optimizer of pytorch-optimizer, heavyball, torch.optim or schedulefree, by name.

``optimizer=zoo optimizer.name=NAME`` builds the library class called ``NAME`` (matched
without regard to case, ``_`` or ``-``: ``sophia_h`` = ``SophiaH``), taken from
``optimizer.library`` (``auto``: the first of :data:`LIBRARIES` that has it) or from the
name itself (``optimizer.name=heavyball.AdamW``; needed where a harness optimizer has the
same name: ``adamw``, ``adamp``, ``muon``, ``sgd``). Every other
option is a keyword argument of that class (``optimizer.betas=[0.9,0.99]``); a keyword the
class does not have is refused with one line. ``python -m baselines.zoo`` lists the names.

What the harness adds, the same for every class:

* **Grouping:** the project's one rule, :func:`ddc.param_groups.param_groups` (weight decay
  only on tensors with two or more dimensions). Classes that split hidden matrices from the
  rest with a ``use_muon`` group flag (pytorch-optimizer's Muon, AdaMuon, NorMuon, AdaGO:
  the classes with an ``adamw_lr`` argument) get ``use_muon`` from the Muon role rule
  (``param_groups(model, wd, muon=True)``: role ``matrix`` -> Muon, the rest -> AdamW);
  their AdamW part runs at ``aux_lr_ratio * lr``.
* **Second learning rates** (:data:`AUX_LRS`: a Muon class's ``adamw_lr``, MARS's ``lr_1d``)
  are given as ``aux_lr_ratio`` times ``lr``, so that ``lr_mult`` scales them too (default
  ratio: the class's own defaults' ratio); ``weight_decay_1d`` (MARS) is 0 by the rule.
* **Own lr estimate** (Prodigy, D-Adaptation, :data:`OWN_LR_ESTIMATE`): the class runs at
  lr 1, and ``lr`` (times ``lr_mult``) multiplies its ``d_coef``; a class without
  ``d_coef`` refuses an lr other than 1 with one line.
* **Loop protocols** (:class:`ddc_bench.training_optimizer.TrainingOptimizer`): schedule-free
  classes (those with ``train()``/``eval()`` methods) get ``train_mode``/``eval_mode`` and,
  unless ``external_schedule=true``, no external LR schedule; Hessian methods
  (:data:`HESSIAN`) get ``create_graph``; :data:`NEEDS_CLOSURE` get ``needs_closure``. A
  class that needs none of these is returned as the plain optimizer.

heavyball compiles its steps with ``torch.compile`` (a C++ compiler on a CPU machine; the
first step takes tens of seconds); an import failure is reported in one line.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ddc.param_groups import param_groups
from ddc_bench.training_optimizer import TrainingOptimizer

#: Libraries in the order ``library=auto`` searches them.
LIBRARIES = ("pytorch_optimizer", "heavyball", "torch", "schedulefree")
#: Accepted values of the ``library`` option.
LIBRARY_CHOICES = ("auto", *LIBRARIES)
#: pip names, for the "not installed" message.
_PIP = {"pytorch_optimizer": "pytorch-optimizer", "heavyball": "heavyball",
        "torch": "torch", "schedulefree": "schedulefree"}

#: (library, name) of classes that estimate their own step size (lr is a multiplier on it).
OWN_LR_ESTIMATE = frozenset(
    ("pytorch_optimizer", n)
    for n in ("prodigy", "dadaptadagrad", "dadaptadam", "dadaptadan", "dadaptlion", "dadaptsgd")
)
#: (library, name) of classes that take Hessian-vector products of the loss's graph.
HESSIAN = frozenset({("pytorch_optimizer", "sophiah"), ("pytorch_optimizer", "adahessian")})
#: (library, name) of classes whose ``step`` needs a closure that recomputes the loss.
NEEDS_CLOSURE = frozenset({("torch", "lbfgs"), ("pytorch_optimizer", "lbfgs"),
                           ("pytorch_optimizer", "alig"), ("pytorch_optimizer", "bsam")})
#: Options the harness reads itself (never passed to the class).
HARNESS_OPTIONS = ("library", "external_schedule", "aux_lr_ratio")
#: A class's second learning rate, for another part of the model: set to aux_lr_ratio * lr.
AUX_LRS = ("adamw_lr", "lr_1d")


class ZooError(ValueError):
    """A bad zoo name or option; the message is one line."""


def _key(name: str) -> str:
    """Names match without regard to case, ``_`` or ``-``."""
    return name.lower().replace("_", "").replace("-", "")


def _is_optimizer_class(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, torch.optim.Optimizer) \
        and obj is not torch.optim.Optimizer


@functools.cache
def library_classes(library: str) -> dict[str, type]:
    """``{matching key: class}`` of every optimizer ``library`` exports publicly.

    Raises :class:`ZooError` (one line) when the library is not installed or cannot be
    imported on this machine.
    """
    if library not in LIBRARIES:
        raise ZooError(f"unknown optimizer library {library!r}; one of {', '.join(LIBRARY_CHOICES)}")
    try:
        module = importlib.import_module(library)
    except ImportError as err:
        raise ZooError(f"optimizer library {library} is not installed ({err}); install it with "
                       f"pip install {_PIP[library]} (or pip install -e '.[zoo]')") from None
    except Exception as err:  # noqa: BLE001 - e.g. a CUDA/Triton check at import time
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ZooError(f"optimizer library {library} cannot be imported here: {first}") from None
    if library == "pytorch_optimizer":
        return {_key(n): module.load_optimizer(n) for n in module.get_supported_optimizers()}
    if library == "torch":
        module = torch.optim
    names = getattr(module, "__all__", None) or dir(module)
    return {_key(n): getattr(module, n) for n in names
            if not n.startswith("_") and _is_optimizer_class(getattr(module, n, None))}


def _installed(library: str) -> dict[str, type]:
    try:
        return library_classes(library)
    except ZooError:
        return {}


def library_names() -> dict[str, list[str]]:
    """``{library: sorted class names}`` of every installed library (``python -m baselines.zoo``)."""
    return {lib: sorted(c.__name__ for c in _installed(lib).values()) for lib in LIBRARIES}


def resolve(name: str, library: str = "auto") -> tuple[str, type]:
    """``(library, class)`` for ``name``; :class:`ZooError` naming the closest names if none."""
    if not isinstance(name, str) or not name:
        raise ZooError(f"optimizer name must be a library class name, got {name!r}")
    if library not in LIBRARY_CHOICES:
        raise ZooError(f"option 'library' must be one of {', '.join(LIBRARY_CHOICES)}, got {library!r}")
    prefix, dot, rest = name.partition(".")
    if dot and prefix in LIBRARIES:  # "heavyball.AdamW": the library named in the name
        if library not in ("auto", prefix):
            raise ZooError(f"optimizer name {name!r} names library {prefix}, but option 'library' is {library}")
        name, library = rest, prefix
    key = _key(name)
    for lib in (LIBRARIES if library == "auto" else (library,)):
        classes = library_classes(lib) if library != "auto" else _installed(lib)
        if key in classes:
            return lib, classes[key]
    raise ZooError(unknown_name_message(name, library))


def unknown_name_message(name: str, library: str = "auto") -> str:
    """One line: ``name`` is unknown, the closest known names (difflib), where to see all."""
    libs = LIBRARIES if library == "auto" else (library,)
    known = {_key(c.__name__): c.__name__ for lib in libs for c in _installed(lib).values()}
    from baselines import BASELINES  # the harness's own names are valid too

    known.update({_key(n): n for n in BASELINES})
    close = difflib.get_close_matches(_key(name), list(known), n=5, cutoff=0.5)
    where = "any library" if library == "auto" else f"library {library}"
    hint = f"closest: {', '.join(known[k] for k in close)}" if close else "no close name"
    return (f"unknown optimizer {name!r} in {where} ({hint}); "
            f"python -m baselines.zoo lists all {len(known)} names")


def _signature(cls: type) -> dict[str, inspect.Parameter]:
    return {p.name: p for p in inspect.signature(cls.__init__).parameters.values()
            if p.name not in ("self", "params")
            and p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)}


def _plain(value: Any) -> Any:
    """YAML lists as tuples (betas, eps pairs); everything else as it is."""
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    return value


def _is_schedule_free(cls: type) -> bool:
    return callable(getattr(cls, "train", None)) and callable(getattr(cls, "eval", None))


def build_zoo(
    model: nn.Module,
    name: str,
    *,
    library: str = "auto",
    external_schedule: bool | None = None,
    aux_lr_ratio: float | None = None,
    **options: Any,
) -> torch.optim.Optimizer | TrainingOptimizer:
    """Build library optimizer ``name`` on ``model`` (see the module docstring).

    ``options`` are keyword arguments of the class (``lr`` and ``weight_decay`` included);
    ``None`` values are left out (the class's default applies). Returns the optimizer, or a
    :class:`TrainingOptimizer` when the class needs a loop protocol.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"optimizer {name!r}: expected an nn.Module, got {type(model).__name__}")
    lib, cls = resolve(name, library)
    label = f"optimizer {name!r} ({lib} {cls.__name__})"
    if external_schedule is not None and not isinstance(external_schedule, bool):
        raise ZooError(f"{label}: option 'external_schedule' must be true, false or null, "
                       f"got {external_schedule!r}")
    signature = _signature(cls)
    kwargs = {k: _plain(v) for k, v in options.items() if v is not None}
    if "weight_decay" not in signature and kwargs.pop("weight_decay", 0.0):
        raise ZooError(f"{label} has no weight decay; set optimizer.weight_decay=0")
    unknown = sorted(set(kwargs) - set(signature))
    if unknown:
        raise ZooError(f"{label}: unknown option(s) {unknown}; its options are "
                       f"{sorted(signature)} and {list(HARNESS_OPTIONS)}")
    key = (lib, _key(cls.__name__))

    if "weight_decay" in signature:
        # Given or the class's default, applied through the grouping rule (>= 2-D only).
        default = signature["weight_decay"].default
        kwargs["weight_decay"] = kwargs.get("weight_decay", default if isinstance(default, (int, float)) else 0.0)
    weight_decay = float(kwargs.get("weight_decay", 0.0))

    if key in OWN_LR_ESTIMATE:
        _lr_into_d_coef(label, kwargs, signature)

    aux = next((k for k in AUX_LRS if k in signature), None)
    if aux_lr_ratio is not None and aux is None:
        raise ZooError(f"{label}: option 'aux_lr_ratio' applies only to classes with a second lr "
                       f"({', '.join(AUX_LRS)})")
    if aux is not None:
        if aux in kwargs:
            raise ZooError(f"{label}: give {aux} as aux_lr_ratio (x lr), so that lr_mult and the "
                           f"schedule scale it too; got {aux}={kwargs[aux]}")
        if aux_lr_ratio is None:
            aux_lr_ratio = signature[aux].default / signature["lr"].default
        kwargs[aux] = float(aux_lr_ratio) * float(kwargs.get("lr", signature["lr"].default))
    if "weight_decay_1d" in signature:
        # The project's rule: no weight decay on tensors with fewer than two dimensions.
        if kwargs.setdefault("weight_decay_1d", 0.0) != 0.0:
            raise ZooError(f"{label}: weight_decay_1d must be 0 (the harness decays only tensors "
                           f"with >= 2 dimensions), got {kwargs['weight_decay_1d']}")
    if "adamw_lr" in signature:  # a Muon-style class: use_muon from the Muon role rule
        groups = [{**g, "use_muon": g["role"] == "matrix"}
                  for g in param_groups(model, weight_decay, muon=True)]
    elif "weight_decay" in signature:
        groups = param_groups(model, weight_decay)
    else:  # nothing to decay, so nothing to group (and LBFGS accepts only one group)
        groups = [p for g in param_groups(model, 0.0) for p in g["params"]]

    try:
        optimizer = cls(groups, **kwargs)
    except Exception as err:  # noqa: BLE001 - libraries raise their own types (NegativeLRError, ...)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ZooError(f"{label}: {first}") from None

    schedule_free = _is_schedule_free(cls)
    protocol = TrainingOptimizer(
        optimizer,
        train_mode=optimizer.train if schedule_free else None,  # type: ignore[attr-defined]
        eval_mode=optimizer.eval if schedule_free else None,  # type: ignore[attr-defined]
        create_graph=key in HESSIAN,
        needs_closure=key in NEEDS_CLOSURE,
        external_schedule=(not schedule_free) if external_schedule is None else external_schedule,
    )
    if protocol == TrainingOptimizer(optimizer):
        return optimizer
    if schedule_free:
        optimizer.train()  # type: ignore[attr-defined]  # a fresh schedule-free optimizer starts in eval mode
    return protocol


def _lr_into_d_coef(label: str, kwargs: dict[str, Any], signature: dict[str, inspect.Parameter]) -> None:
    """Run an own-estimate class at lr 1 with ``d_coef`` multiplied by the given lr."""
    lr = float(kwargs.get("lr", 1.0))
    if not math.isfinite(lr) or lr <= 0:
        raise ZooError(f"{label}: lr must be > 0, got {lr}")
    if "d_coef" in signature:
        kwargs["d_coef"] = float(kwargs.get("d_coef", signature["d_coef"].default)) * lr
    elif lr != 1.0:
        raise ZooError(f"{label} keeps its own lr estimate and has no d_coef to scale; "
                       f"run it at lr 1 (optimizer.lr=1, lr_mult=1), got lr {lr:g}")
    kwargs["lr"] = 1.0


def zoo_builder(name: str, library: str = "auto") -> Callable[..., torch.optim.Optimizer | TrainingOptimizer]:
    """A registry builder ``build(model, **options)`` for library class ``name``; ``library``
    is used when the options say ``library: auto`` or nothing."""

    def build(model: nn.Module, **options: Any) -> torch.optim.Optimizer | TrainingOptimizer:
        chosen = options.pop("library", "auto")
        return build_zoo(model, name, library=library if chosen in (None, "auto") else chosen, **options)

    build.__doc__ = f"Library optimizer {name!r} (baselines.zoo.build_zoo)."
    build.optimizer_name = name  # type: ignore[attr-defined]
    return build


def _refuse_bare_zoo(model: nn.Module, **options: Any) -> torch.optim.Optimizer:
    raise ZooError("optimizer=zoo needs the library optimizer's name: optimizer=zoo "
                   "optimizer.name=NAME (python -m baselines.zoo lists the names)")


#: Recipes of configs/optimizer/<recipe>.yaml: recipe name -> (library, class name).
RECIPES: dict[str, tuple[str, str]] = {
    "lion": ("pytorch_optimizer", "lion"),
    "signum": ("pytorch_optimizer", "signsgd"),
    "adopt": ("pytorch_optimizer", "adopt"),
    "ademamix": ("pytorch_optimizer", "ademamix"),
    "mars": ("pytorch_optimizer", "mars"),
    "prodigy": ("pytorch_optimizer", "prodigy"),
    "sf_adamw": ("schedulefree", "adamwschedulefree"),
    "soap": ("pytorch_optimizer", "soap"),
    "sophia": ("pytorch_optimizer", "sophiah"),
    "kron": ("pytorch_optimizer", "kron"),
    "adafactor": ("torch", "adafactor"),
    "d_muon": ("pytorch_optimizer", "muon"),
}


class ZooRegistry(dict):
    """The optimizer registry: the harness's builders, the recipes and ``zoo`` eagerly,
    every library class name on demand (looked up, and its library imported, only when a
    name is not one of the eager ones)."""

    def __contains__(self, name: object) -> bool:
        if dict.__contains__(self, name):
            return True
        if not isinstance(name, str):
            return False
        try:
            resolve(name)
        except ZooError:
            return False
        return True

    def __missing__(self, name: str) -> Callable[..., Any]:
        resolve(name)  # raises ZooError (a KeyError would hide the closest names)
        return zoo_builder(name)


def zoo_registry(builders: dict[str, Callable[..., Any]]) -> ZooRegistry:
    """``builders`` plus ``zoo``, the :data:`RECIPES` and (lazily) every library name."""
    registry = ZooRegistry(builders)
    registry["zoo"] = _refuse_bare_zoo
    for recipe, (library, name) in RECIPES.items():
        registry[recipe] = zoo_builder(name, library)
    return registry


def _main(argv: Iterable[str] | None = None) -> None:
    """Print every library optimizer name, one library a line."""
    for lib, names in library_names().items():
        print(f"{lib} ({len(names)}): {', '.join(names) if names else '(not installed)'}")


if __name__ == "__main__":
    _main()
