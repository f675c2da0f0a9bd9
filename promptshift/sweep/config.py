"""Sweep configuration: what to run, validated on construction.

A SWEEP argument anywhere in the CLI may be a sweep YAML, a JSON prompt file in the
notebook's shape, or the name of a built-in suite. All three resolve to one
:class:`SweepConfig`; errors name the offending field.

Size: the sweep's schema and its validation, field by field, for both file formats (YAML
and the notebook JSON); every error message that names a field is here, so a user's
mistake is explained in one place. Reply checks are in :mod:`promptshift.sweep.behaviour`.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from promptshift.errors import SweepError
from promptshift.sweep.behaviour import (
    DEFAULT_LANGUAGES,
    MATCHERS,
    REFUSAL_MARKERS,
    Check,
    check_expected,
    parse_check,
    parse_checks,
)
from promptshift.vocabulary import COMPONENTS

KEEP_CHOICES = ("last", "suffix", "all")
BASELINE_BUILTINS = ("no_system_turn", "empty_system")
NO_SYSTEM_ROLE_POLICIES = ("error", "prepend_to_user")
USER_CATEGORIES_HINT = ("factual", "reasoning", "classification", "creative", "instruction", "edge")


# An attribute is a field of a prompt entry that promptshift does not interpret (the
# notebook's `difficulty`, `type`, `note`): kept as written, shown as a column in the
# tables, usable in `select.attributes`. Scalars or lists of scalars.
Attributes = dict[str, Any]


@dataclass(frozen=True)
class SystemPrompt:
    name: str
    text: str
    tags: tuple[str, ...] = ()
    description: str = ""
    family: str | None = None
    level: str | None = None
    attributes: Attributes = field(default_factory=dict, hash=False)
    checks: tuple[Check, ...] = ()  # declared checks of the instruction (promptshift.sweep.behaviour)


@dataclass(frozen=True)
class InstructionPrefix:
    """An instruction put at the start of the user turn, before the user prompt (the
    notebook's ``instruction_prefixes``). A variant like a system prompt: its pairs compare
    the user prompt with the prefix against the same user prompt without it (the sweep's
    baseline). ``same_as`` names the system prompt that holds the same instruction (by
    default the system prompt of the same name, if there is one): the two placements of one
    instruction are then compared side by side."""

    name: str
    text: str
    same_as: str | None = None
    tags: tuple[str, ...] = ()
    description: str = ""


@dataclass(frozen=True)
class UserPrompt:
    id: str
    text: str
    category: str = "uncategorized"
    expected: str | None = None
    attributes: Attributes = field(default_factory=dict, hash=False)
    match: str | None = None  # matcher of `expected` (None: the sweep's `behaviour.match`)


@dataclass(frozen=True)
class Behaviour:
    """How replies are judged (``behaviour:`` in a sweep YAML; promptshift/sweep/behaviour.py
    defines each judgement).

    ``max_new_tokens`` lengthens the greedy continuation for behaviour only: extraction
    generates this many tokens, the output-change distances keep using the sweep's
    ``max_new_tokens`` first tokens, and the behaviour tables read the whole continuation
    (None: the sweep's ``max_new_tokens``). ``match`` is the default matcher of ``expected``
    answers, ``languages`` the ISO 639 codes replies are identified among (None: every
    language py3langid knows; a sweep writes ``all``), ``refusal_markers`` the phrases that
    flag a refusal. Only ``max_new_tokens`` changes what a store holds; the rest (and the
    declared checks and matchers) can change after extraction."""

    max_new_tokens: int | None = None
    match: str = "contains"
    languages: tuple[str, ...] | None = DEFAULT_LANGUAGES
    refusal_markers: tuple[str, ...] = REFUSAL_MARKERS


@dataclass
class SweepConfig:
    """Everything that decides the plan and the extraction. Saved into the store."""

    name: str = "sweep"
    model: str | None = None
    chat_template: str | None = None
    trust_remote_code: bool = False
    system_prompts: list[SystemPrompt] = field(default_factory=list)
    user_prompts: list[UserPrompt] = field(default_factory=list)
    baseline: str = "empty_system"
    no_system_role: str = "error"
    keep: str = "suffix"
    components: tuple[str, ...] = COMPONENTS
    max_new_tokens: int = 32
    top_k: int = 64
    lens_top_k: int = 10
    token_budget: int = 4096
    block_prompts: int = 64
    storage_dtype: str = "float16"
    full_attention_layers: tuple[int, ...] = ()
    full_logprobs: bool = True  # keep every prompt's whole next-token log-probs (exact KL/JS; 4 x vocab bytes)
    metadata: dict[str, Any] = field(default_factory=dict)  # the prompt file's own `metadata`, kept as is
    instruction_prefixes: list[InstructionPrefix] = field(default_factory=list)
    prefix_separator: str = "\n\n"  # between an instruction prefix and the user prompt, inside the user turn
    behaviour: Behaviour = field(default_factory=Behaviour)
    source: str = ""

    def __post_init__(self) -> None:
        self.components = tuple(self.components)
        self.full_attention_layers = tuple(self.full_attention_layers)
        if not isinstance(self.behaviour, Behaviour):
            self.behaviour = parse_behaviour(self.behaviour, "the sweep")
        if self.keep not in KEEP_CHOICES:
            raise SweepError(f"`keep` must be one of {', '.join(KEEP_CHOICES)}, got {self.keep!r}")
        bad = [c for c in self.components if c not in COMPONENTS]
        if bad:
            raise SweepError(f"unknown component(s) {bad} in `components`; known: {', '.join(COMPONENTS)}")
        if self.no_system_role not in NO_SYSTEM_ROLE_POLICIES:
            raise SweepError(
                f"`no_system_role` must be one of {', '.join(NO_SYSTEM_ROLE_POLICIES)}, got {self.no_system_role!r}"
            )
        for fname, lo, hi in (
            ("max_new_tokens", 0, 4096),
            ("top_k", 1, 4096),
            ("lens_top_k", 1, 1024),
            ("token_budget", 16, 10_000_000),
            ("block_prompts", 1, 65536),
        ):
            v = getattr(self, fname)
            if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
                raise SweepError(f"`{fname}` must be an integer in [{lo}, {hi}], got {v!r}")
        if not isinstance(self.full_logprobs, bool):
            raise SweepError(f"`full_logprobs` must be true or false, got {self.full_logprobs!r}")
        if self.storage_dtype not in ("float16", "float32"):
            raise SweepError(f"`storage_dtype` must be float16 or float32, got {self.storage_dtype!r}")
        if not self.system_prompts:
            raise SweepError("the sweep has no system prompts; add at least one under `system_prompts`")
        if not self.user_prompts:
            raise SweepError("the sweep has no user prompts; add at least one under `user_prompts`")
        _unique([s.name for s in self.system_prompts], "system_prompts", "name")
        _unique([u.id for u in self.user_prompts], "user_prompts", "id")
        for s in self.system_prompts:
            if not s.text.strip():
                raise SweepError(
                    f"system prompt `{s.name}` has empty text; the baseline is set with `baseline: empty_system` "
                    "or `no_system_turn`, not as a system prompt"
                )
        if not isinstance(self.metadata, dict):
            raise SweepError(f"`metadata` must be a mapping, got {type(self.metadata).__name__}")
        for u in self.user_prompts:
            _check_attributes(u.attributes, f"user prompt `{u.id}`", RESERVED_USER_ATTRIBUTES)
        for s in self.system_prompts:
            _check_attributes(s.attributes, f"system prompt `{s.name}`", RESERVED_SYSTEM_ATTRIBUTES)
        self._check_behaviour()
        names = {s.name for s in self.system_prompts}
        self._check_prefixes(names)
        if self.baseline not in BASELINE_BUILTINS and self.baseline not in names:
            raise SweepError(
                f"unknown `baseline` {self.baseline!r}: use no_system_turn, empty_system or the name of a system "
                f"prompt in the sweep ({', '.join(sorted(names))})"
            )

    def _check_prefixes(self, system_names: set[str]) -> None:
        self.instruction_prefixes = [InstructionPrefix(**x) if isinstance(x, dict) else x
                                     for x in self.instruction_prefixes]
        _unique([x.name for x in self.instruction_prefixes], "instruction_prefixes", "name")
        for x in self.instruction_prefixes:
            if not isinstance(x.text, str) or not x.text.strip():
                raise SweepError(f"instruction prefix `{x.name}` has empty or whitespace-only text; leave it out (the "
                                 "user prompt without a prefix is the baseline)")
            if x.same_as is not None and x.same_as not in system_names:
                raise SweepError(f"instruction prefix `{x.name}` has `same_as: {x.same_as}`, which is not a system "
                                 f"prompt of the sweep ({', '.join(sorted(system_names))})")
            if x.same_as is not None and x.same_as == self.baseline:
                raise SweepError(f"instruction prefix `{x.name}` is the same instruction as the baseline `{x.same_as}`; "
                                 "the baseline is not compared with itself, so there is no placement to compare")
        if not isinstance(self.prefix_separator, str):
            raise SweepError(f"`prefix_separator` must be a string, got {type(self.prefix_separator).__name__}")

    def placements(self) -> list[tuple[str, str]]:
        """(system prompt name, prefix name) for every instruction the sweep holds in both
        places: a prefix's ``same_as``, or else a compared system prompt of the same name."""
        compared = {s.name for s in self.variants}
        out = []
        for x in self.instruction_prefixes:
            sys_name = x.same_as if x.same_as is not None else (x.name if x.name in compared else None)
            if sys_name is not None:
                out.append((sys_name, x.name))
        return out

    def _check_behaviour(self) -> None:
        b = self.behaviour
        if b.max_new_tokens is not None and b.max_new_tokens < self.max_new_tokens:
            raise SweepError(f"`behaviour.max_new_tokens` ({b.max_new_tokens}) is shorter than `max_new_tokens` "
                             f"({self.max_new_tokens}); it lengthens the continuation for behaviour, so it must be at "
                             "least as long (or left out)")
        for sp in self.system_prompts:
            for c in sp.checks:  # language codes against this sweep's candidate languages
                parse_check(c.to_dict(), f"system prompt `{sp.name}`", b.languages)
                if c.type == "max_words" and c.value >= self.gen_tokens:
                    warnings.warn(f"system prompt `{sp.name}` declares max_words: {c.value}, but replies are cut at "
                                  f"{self.gen_tokens} new tokens, so an unfinished reply can never exceed it and "
                                  "stays undecided; set `behaviour.max_new_tokens` above the word limit",
                                  stacklevel=3)
        for u in self.user_prompts:
            if u.match is not None and u.match not in MATCHERS:
                raise SweepError(f"unknown `match` {u.match!r} of user prompt `{u.id}`; matchers: "
                                 f"{', '.join(MATCHERS)}")
            if u.expected is not None:
                check_expected(u.expected, u.match or b.match, f"user prompt `{u.id}`")

    @property
    def gen_tokens(self) -> int:
        """Greedy continuation length extraction generates: the longer of ``max_new_tokens``
        and ``behaviour.max_new_tokens``."""
        return max(self.max_new_tokens, self.behaviour.max_new_tokens or 0)

    @property
    def variants(self) -> list[SystemPrompt]:
        """System prompts compared against the baseline (a named baseline is not compared with itself)."""
        return [s for s in self.system_prompts if s.name != self.baseline]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict. Empty `attributes` and `metadata`, and behaviour declarations
        at their defaults (no checks, no matcher, default ``behaviour``), are left out, so a
        sweep without them serialises (and hashes into its plan) as it did before they existed."""
        d = dataclasses.asdict(self)
        d["components"] = list(self.components)
        d["full_attention_layers"] = list(self.full_attention_layers)
        for it in d["system_prompts"] + d["user_prompts"]:
            if not it["attributes"]:
                del it["attributes"]
        if not d["metadata"]:
            del d["metadata"]
        if not d["instruction_prefixes"]:  # no prefixes: the dict (and plan hash) of a sweep without them
            del d["instruction_prefixes"], d["prefix_separator"]
        else:
            for it in d["instruction_prefixes"]:
                it["tags"] = list(it["tags"])
        if d["full_logprobs"]:  # the default: stores made before the setting existed hash as before
            del d["full_logprobs"]
        for sp, it in zip(self.system_prompts, d["system_prompts"]):
            if sp.checks:
                it["checks"] = [c.to_dict() for c in sp.checks]
            else:
                del it["checks"]
        for it in d["user_prompts"]:
            if it["match"] is None:
                del it["match"]
        default = Behaviour()
        b = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self.behaviour).items()
             if v != getattr(default, k)}
        if b:
            d["behaviour"] = b
        else:
            del d["behaviour"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SweepConfig:
        d = dict(d)
        d["system_prompts"] = [SystemPrompt(**{**s, "tags": tuple(s.get("tags", ())),
                                               "checks": parse_checks(s.get("checks"), f"system prompt `{s['name']}`",
                                                                      None)})
                               for s in d["system_prompts"]]
        d["user_prompts"] = [UserPrompt(**u) for u in d["user_prompts"]]
        d["instruction_prefixes"] = [InstructionPrefix(**{**x, "tags": tuple(x.get("tags", ()))})
                                     for x in d.get("instruction_prefixes", [])]
        if "behaviour" in d:
            d["behaviour"] = parse_behaviour(d["behaviour"], "the stored sweep")
        return cls(**d)

    # --- constructors of the Python API (``promptshift.Sweep``) -----------------------------
    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> SweepConfig:
        """A sweep YAML or a notebook-format JSON prompt file; ``overrides`` (any field, e.g.
        ``model=``, ``baseline=``) win over the file. Raises SweepError naming the bad field."""
        if not Path(path).is_file():
            raise SweepError(f"sweep file {path} does not exist")
        return load_sweep(Path(path), **overrides)

    @classmethod
    def builtin(cls, name: str = "quick", **overrides: Any) -> SweepConfig:
        """A built-in sweep (``quick``) or suite (``default``); ``promptshift suites`` lists them."""
        if name not in builtin_sweeps() and name not in builtin_suites():
            raise SweepError(f"unknown built-in sweep {name!r}; built-in: "
                             f"{', '.join(sorted({*builtin_sweeps(), *builtin_suites()}))}")
        return load_sweep(name, **overrides)

    @classmethod
    def from_prompts(cls, system_prompts: Any, user_prompts: Any, *, name: str = "notebook",
                     **settings: Any) -> SweepConfig:
        """A sweep from Python objects, for notebooks.

        ``system_prompts``: ``{name: text}``, ``{name: {text, tags, checks, ...}}``, a list of
        texts (named ``system_0``, ``system_1``, ...), or a list of mappings/SystemPrompt.
        ``user_prompts``: ``{id: text}``, a list of texts (``user_0``, ...), or a list of
        mappings ``{id, text, category, expected, ...}``/UserPrompt. ``settings``: any other
        field of the sweep (``baseline``, ``model``, ``keep``, ``max_new_tokens``, ...).
        Entries are validated like a sweep YAML's; errors name the entry."""
        where = "the Python sweep"
        d = {"name": name, "source": f"python:{name}",
             "system_prompts": _python_entries(system_prompts, "system", "name", SystemPrompt, _parse_system, where),
             "user_prompts": _python_entries(user_prompts, "user", "id", UserPrompt, _parse_user, where)}
        unknown = sorted(set(settings) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise SweepError(f"unknown sweep setting(s) {unknown}; allowed: "
                             f"{', '.join(f.name for f in dataclasses.fields(cls))}")
        return cls(**{**d, **settings})


def parse_behaviour(raw: Any, where: str) -> Behaviour:
    """The ``behaviour:`` mapping of a sweep, validated."""
    if isinstance(raw, Behaviour):
        return raw
    if raw is None:
        return Behaviour()
    if not isinstance(raw, dict):
        raise SweepError(f"`behaviour` in {where} must be a mapping (max_new_tokens, match, languages, "
                         "refusal_markers)")
    _check_keys(raw, {f.name for f in dataclasses.fields(Behaviour)}, f"{where}: behaviour")
    out: dict[str, Any] = {}
    if (n := raw.get("max_new_tokens")) is not None:
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 4096:
            raise SweepError(f"`behaviour.max_new_tokens` in {where} must be an integer in [1, 4096], got {n!r}")
        out["max_new_tokens"] = n
    if (m := raw.get("match")) is not None:
        if m not in MATCHERS:
            raise SweepError(f"`behaviour.match` in {where} must be one of {', '.join(MATCHERS)}, got {m!r}")
        out["match"] = m
    if "languages" in raw:
        langs = raw["languages"]
        if langs == "all" or langs is None:
            out["languages"] = None
        elif (isinstance(langs, (list, tuple)) and langs
              and all(isinstance(x, str) and x.strip().isalpha() for x in langs)):
            out["languages"] = tuple(sorted({x.strip().lower() for x in langs}))
        else:
            raise SweepError(f"`behaviour.languages` in {where} must be a list of ISO 639 codes or `all`, "
                             f"got {langs!r}")
    if (rm := raw.get("refusal_markers")) is not None:
        if not isinstance(rm, (list, tuple)) or not all(isinstance(x, str) and x.strip() for x in rm):
            raise SweepError(f"`behaviour.refusal_markers` in {where} must be a list of phrases")
        out["refusal_markers"] = tuple(rm)
    return Behaviour(**out)


def content_dict(sweep: dict[str, Any]) -> dict[str, Any]:
    """A serialised sweep without what only judges replies (declared checks, matchers,
    behaviour settings other than the continuation length): what decides a store's content,
    and so its plan hash. Changing a check does not call for a new extraction."""
    d = dict(sweep)
    d["system_prompts"] = [{k: v for k, v in s.items() if k != "checks"} for s in d.get("system_prompts", [])]
    d["user_prompts"] = [{k: v for k, v in u.items() if k != "match"} for u in d.get("user_prompts", [])]
    b = {k: v for k, v in (d.pop("behaviour", None) or {}).items() if k == "max_new_tokens"}
    if b:
        d["behaviour"] = b
    return d


# Columns of the result tables an attribute is shown next to (per pair / per user prompt,
# and per system prompt): an attribute may not take one of these names, or it would
# overwrite the column.
RESERVED_USER_ATTRIBUTES = frozenset({
    "id", "prompt", "text", "expected", "match", "category", "pair", "system", "user_id", "role", "kind", "layer",
    "component", "position", "region", "head", "scope", "placement", "instruction", "is_control",
    # columns of the per-pair tables the attributes are added to (docs/RESULTS.md)
    "cosine", "cosine_centered", "l2", "rel_change", "norm_variant", "norm_baseline", "tv_aligned",
    "mass_system_variant", "mass_user_variant", "mass_user_baseline", "kl", "js", "top1_changed", "topk_overlap",
    "entropy_variant", "entropy_baseline", "gen_edit_distance", "first_divergence", "len_change", "gen_variant",
    "gen_baseline", "kl_lens", "top1_lens_variant", "top1_lens_baseline", "top1_agree",
    "final_top1_logprob_variant", "final_top1_logprob_baseline",
})
RESERVED_SYSTEM_ATTRIBUTES = frozenset({
    "name", "system", "text", "tags", "description", "family", "level", "category", "placement", "instruction",
    "n_system_tokens", "n_words", "impact", "kl", "n_pairs", "checks",
})


def _check_attributes(attrs: Any, where: str, reserved: frozenset[str]) -> None:
    if not isinstance(attrs, dict):
        raise SweepError(f"`attributes` of {where} must be a mapping of name -> value")
    for k, v in attrs.items():
        if not isinstance(k, str) or not k:
            raise SweepError(f"attribute names of {where} must be non-empty strings, got {k!r}")
        if k in reserved or k.startswith("kw_"):
            raise SweepError(f"attribute `{k}` of {where} clashes with a column of the result tables; rename it "
                             f"(reserved: {', '.join(sorted(reserved))} and names starting with kw_)")
        vals = v if isinstance(v, list) else [v]
        if not all(x is None or isinstance(x, (str, int, float, bool)) for x in vals):
            raise SweepError(f"attribute `{k}` of {where} must be a string, number, boolean or a list of them, "
                             f"got {type(v).__name__}")


def attribute_text(v: Any) -> str | None:
    """An attribute value as one table cell: lists comma-joined, None stays None."""
    if v is None:
        return None
    if isinstance(v, list):
        return ",".join("" if x is None else str(x) for x in v)
    return str(v)


def _unique(values: list[str], where: str, key: str) -> None:
    seen: set[str] = set()
    for v in values:
        if v in seen:
            raise SweepError(f"duplicate {key} {v!r} in `{where}`; every {key} must be unique")
        seen.add(v)


def builtin_suites() -> dict[str, Path]:
    """Prompt suites shipped with the package (system x user prompts, or multi-turn)."""
    folder = resources.files("promptshift.sweep") / "suites"
    return {Path(str(p)).stem: Path(str(p)) for p in folder.iterdir() if str(p).endswith(".yaml")}


def describe_suites() -> list[str]:
    """``promptshift suites``: one line per built-in suite (system and user prompt counts,
    tags and categories; or conversations, turns and rule of a multi-turn suite), each
    followed by its description."""
    lines = []
    for name, path in sorted(builtin_suites().items()):
        d = yaml.safe_load(path.read_text(encoding="utf-8"))
        if "system_prompts" in d:
            cats = sorted({u.get("category", "?") for u in d["user_prompts"]})
            tags = sorted({t for s in d["system_prompts"] for t in s.get("tags", [])})
            lines.append(f"{name}: {len(d['system_prompts'])} system prompts ({', '.join(tags)}), "
                         f"{len(d['user_prompts'])} user prompts ({', '.join(cats)})")
        elif "conversations" in d:
            turns = sum(len(c["turns"]) for c in d["conversations"])
            lines.append(f"{name}: multi-turn, {len(d['conversations'])} conversations, {turns} turns, "
                         f"rule: {d['rule']['description']}")
        if d.get("description"):
            lines.append(f"    {d['description']}")
    return lines


def builtin_sweeps() -> dict[str, Path]:
    """Sweep files shipped with the package (a suite plus settings), e.g. ``quick``."""
    folder = resources.files("promptshift.sweep") / "sweeps"
    return {Path(str(p)).stem: Path(str(p)) for p in folder.iterdir() if str(p).endswith(".yaml")}


_SYSTEM_KEYS = {"name", "text", "tags", "description", "family", "level", "attributes", "checks"}
_USER_KEYS = {"id", "text", "category", "expected", "attributes", "match"}
_SWEEP_KEYS = {f.name for f in dataclasses.fields(SweepConfig)} | {"suite", "prompts", "description", "select"}
_SELECT_KEYS = {"system_prompts", "user_prompts", "categories", "max_user_prompts", "attributes",
                "instruction_prefixes"}
_PREFIX_KEYS = {"name", "text", "same_as", "tags", "description", "category"}
# the notebook's JSON prompt file: top-level keys, and the keys of a system prompt entry
# that mean something to promptshift (any other key of an entry is an attribute)
_JSON_KEYS = {"test_prompts", "system_prompts", "metadata", "instruction_prefixes"}
_JSON_SYSTEM_KEYS = {"text", "description", "category", "tags", "family", "level", "checks"}
_JSON_USER_KEYS = {"id", "prompt", "expected", "category", "match"}


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SweepError(f"{path} is not valid UTF-8 (byte {e.start}); save it as UTF-8") from e
    except OSError as e:
        raise SweepError(f"cannot read {path}: {e.strerror}") from e


def _load_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(_read_text(path))
    except yaml.YAMLError as e:
        raise SweepError(f"{path} is not valid YAML: {e}") from e


def _load_json(path: Path) -> Any:
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise SweepError(f"{path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from e


def _check_keys(d: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise SweepError(f"unknown key(s) {unknown} in {where}; allowed: {', '.join(sorted(allowed))}")


def _str_field(d: dict, key: str, where: str, required: bool = True) -> str | None:
    v = d.get(key)
    if v is None:
        if required:
            raise SweepError(f"{where} is missing `{key}`")
        return None
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        v = str(v)
    if not isinstance(v, str):
        raise SweepError(f"`{key}` in {where} must be a string, got {type(v).__name__}")
    return v


def _parse_system(items: Any, where: str) -> list[SystemPrompt]:
    if not isinstance(items, list):
        raise SweepError(f"`system_prompts` in {where} must be a list of {{name, text, tags}} entries")
    out = []
    for i, s in enumerate(items):
        w = f"{where}: system_prompts[{i}]"
        if not isinstance(s, dict):
            raise SweepError(f"{w} must be a mapping with name and text")
        _check_keys(s, _SYSTEM_KEYS, w)
        tags = s.get("tags") or []
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise SweepError(f"`tags` in {w} must be a list of strings")
        out.append(
            SystemPrompt(
                name=_str_field(s, "name", w),
                text=_str_field(s, "text", w),
                tags=tuple(tags),
                description=_str_field(s, "description", w, False) or "",
                family=_str_field(s, "family", w, False),
                level=_str_field(s, "level", w, False),
                attributes=s.get("attributes") or {},
                checks=parse_checks(s.get("checks"), w, None),  # languages: checked against the sweep's
            )
        )
    return out


def _parse_user(items: Any, where: str) -> list[UserPrompt]:
    if not isinstance(items, list):
        raise SweepError(f"`user_prompts` in {where} must be a list of {{id, text, category}} entries")
    out = []
    for i, u in enumerate(items):
        w = f"{where}: user_prompts[{i}]"
        if not isinstance(u, dict):
            raise SweepError(f"{w} must be a mapping with id and text")
        _check_keys(u, _USER_KEYS, w)
        out.append(
            UserPrompt(
                id=_str_field(u, "id", w),
                text=_str_field(u, "text", w),
                category=_str_field(u, "category", w, False) or "uncategorized",
                expected=_str_field(u, "expected", w, False),
                attributes=u.get("attributes") or {},
                match=_str_field(u, "match", w, False),
            )
        )
    return out


def _json_attributes(it: dict, known: set[str]) -> dict[str, Any]:
    return {k: v for k, v in it.items() if k not in known}


def _parse_prompt_json(data: Any, where: str) -> dict[str, Any]:
    """The notebook's prompt file, read as it is: ``test_prompts`` (category -> list of
    {id, prompt, expected, ...}), ``system_prompts`` (name -> {text, description, category,
    ...}), and optionally ``metadata`` (kept in the store's provenance) and
    ``instruction_prefixes``. An entry with empty text is the notebook's "no system
    prompt": it selects the baseline ``no_system_turn`` (no system message at all), which is
    this format's default baseline with or without such an entry. A system prompt's
    ``category`` becomes a tag; any other field of an entry is kept as an attribute."""
    if not isinstance(data, dict):
        raise SweepError(f"{where} must be a JSON object with `test_prompts` and `system_prompts`")
    _check_keys(data, _JSON_KEYS, where)
    tp, sp = data.get("test_prompts"), data.get("system_prompts")
    if not isinstance(tp, dict):
        raise SweepError(f"`test_prompts` in {where} must map category -> list of prompts")
    if not isinstance(sp, dict):
        raise SweepError(f"`system_prompts` in {where} must map name -> {{text, description}}")
    meta = data.get("metadata", {})
    if not isinstance(meta, dict):
        raise SweepError(f"`metadata` in {where} must be an object, got {type(meta).__name__}")
    users = []
    for cat, items in tp.items():
        if not isinstance(items, list):
            raise SweepError(f"`test_prompts.{cat}` in {where} must be a list")
        for i, it in enumerate(items):
            w = f"{where}: test_prompts.{cat}[{i}]"
            if not isinstance(it, dict):
                raise SweepError(f"{w} must be an object with id and prompt")
            own = it.get("category", cat)
            if str(own) != str(cat):
                raise SweepError(f"{w} has `category` {own!r} but sits under {cat!r}; drop the field or move the entry")
            users.append(
                UserPrompt(
                    id=_str_field(it, "id", w),
                    text=_str_field(it, "prompt", w),
                    category=str(cat),
                    expected=_str_field(it, "expected", w, False),
                    attributes=_json_attributes(it, _JSON_USER_KEYS),
                    match=_str_field(it, "match", w, False),
                )
            )
    systems, baseline = [], None
    for name, it in sp.items():
        w = f"{where}: system_prompts.{name}"
        if not isinstance(it, dict):
            raise SweepError(f"{w} must be an object with text")
        text = _str_field(it, "text", w)
        if not text.strip():
            if baseline is not None:
                raise SweepError(f"{where} has two baseline entries with empty text: {baseline!r} and {name!r}")
            baseline = name
            continue
        tags = it.get("tags") or []
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise SweepError(f"`tags` in {w} must be a list of strings")
        category = _str_field(it, "category", w, False)
        if category and category not in tags:
            tags = [*tags, category]
        systems.append(SystemPrompt(
            name=str(name), text=text, tags=tuple(tags), description=_str_field(it, "description", w, False) or "",
            family=_str_field(it, "family", w, False), level=_str_field(it, "level", w, False),
            attributes=_json_attributes(it, _JSON_SYSTEM_KEYS), checks=parse_checks(it.get("checks"), w, None)))
    out = {"system_prompts": systems, "user_prompts": users, "baseline": "no_system_turn", "metadata": meta}
    if "instruction_prefixes" in data:
        out["instruction_prefixes"] = _parse_prefixes(data["instruction_prefixes"], where)
    return out


def _parse_prefixes(items: Any, where: str) -> list[InstructionPrefix]:
    """Instruction prefixes as the notebook writes them (name -> text, or name -> {text,
    same_as, description, category, tags}) or as a YAML list of {name, text, ...}."""
    if isinstance(items, dict):
        items = [{"name": k, **(v if isinstance(v, dict) else {"text": v})} for k, v in items.items()]
    if not isinstance(items, list):
        raise SweepError(f"`instruction_prefixes` in {where} must map name -> text (or a list of {{name, text}})")
    out = []
    for i, it in enumerate(items):
        w = f"{where}: instruction_prefixes[{i}]"
        if not isinstance(it, dict):
            raise SweepError(f"{w} must be a text or an object with text")
        _check_keys(it, _PREFIX_KEYS, w)
        tags = it.get("tags") or []
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise SweepError(f"`tags` in {w} must be a list of strings")
        category = _str_field(it, "category", w, False)
        if category and category not in tags:
            tags = [*tags, category]
        out.append(InstructionPrefix(name=_str_field(it, "name", w), text=_str_field(it, "text", w),
                                     same_as=_str_field(it, "same_as", w, False), tags=tuple(tags),
                                     description=_str_field(it, "description", w, False) or ""))
    return out


def _load_suite(name: str) -> dict[str, Any]:
    suites = builtin_suites()
    if name not in suites:
        raise SweepError(f"unknown suite {name!r}; built-in suites: {', '.join(sorted(suites))}")
    data = _load_yaml(suites[name])
    where = f"suite {name}"
    if "system_prompts" not in data:
        raise SweepError(f"suite {name!r} is not a system x user suite (it has no system_prompts)")
    return {
        "system_prompts": _parse_system(data["system_prompts"], where),
        "user_prompts": _parse_user(data["user_prompts"], where),
        "name": data.get("name", name),
    }


def _apply_select(d: dict[str, Any], select: Any, where: str) -> None:
    if select is None:
        return
    if not isinstance(select, dict):
        raise SweepError(f"`select` in {where} must be a mapping")
    _check_keys(select, _SELECT_KEYS, f"{where}: select")
    if (names := select.get("system_prompts")) is not None:
        known = {s.name: s for s in d["system_prompts"]}
        missing = [n for n in names if n not in known]
        if missing:
            raise SweepError(f"`select.system_prompts` names unknown system prompt(s) {missing}")
        d["system_prompts"] = [known[n] for n in names]
    if (names := select.get("instruction_prefixes")) is not None:
        known_x = {x.name: x for x in d.get("instruction_prefixes", [])}
        missing = [n for n in names if n not in known_x]
        if missing:
            raise SweepError(f"`select.instruction_prefixes` names unknown instruction prefix(es) {missing}")
        d["instruction_prefixes"] = [known_x[n] for n in names]
    if (cats := select.get("categories")) is not None:
        d["user_prompts"] = [u for u in d["user_prompts"] if u.category in cats]
    if (ids := select.get("user_prompts")) is not None:
        known_u = {u.id: u for u in d["user_prompts"]}
        missing = [i for i in ids if i not in known_u]
        if missing:
            raise SweepError(f"`select.user_prompts` names unknown user prompt(s) {missing}")
        d["user_prompts"] = [known_u[i] for i in ids]
    if (attrs := select.get("attributes")) is not None:
        if not isinstance(attrs, dict):
            raise SweepError(f"`select.attributes` in {where} must map an attribute name to a value or list of values")
        for name, want in attrs.items():
            want = {attribute_text(x) for x in (want if isinstance(want, list) else [want])}
            if not any(name in u.attributes for u in d["user_prompts"]):
                known = sorted({k for u in d["user_prompts"] for k in u.attributes})
                raise SweepError(f"`select.attributes` names {name!r}, which no user prompt has; attributes: "
                                 f"{', '.join(known) or 'none'}")
            d["user_prompts"] = [u for u in d["user_prompts"] if _attr_matches(u.attributes.get(name), want)]
    if (n := select.get("max_user_prompts")) is not None:
        d["user_prompts"] = d["user_prompts"][: int(n)]


def _attr_matches(value: Any, want: set[str | None]) -> bool:
    """A value (or any element of a list value) is one of the wanted ones, compared as text."""
    vals = value if isinstance(value, list) else [value]
    return any(attribute_text(v) in want for v in vals)


def load_sweep(arg: str | Path | None = None, **overrides: Any) -> SweepConfig:
    """Resolve a SWEEP argument (YAML file, JSON prompt file or suite name) to a config.

    ``overrides`` (e.g. ``model=...`` from the CLI) win over the file; ``None`` values are
    ignored so unset CLI flags do not erase the file's settings."""
    arg = "default" if arg is None else str(arg)
    path = Path(arg)
    if not path.exists() and arg in builtin_sweeps():
        path = builtin_sweeps()[arg]
    d: dict[str, Any]
    if path.suffix.lower() == ".json":
        if not path.is_file():
            raise SweepError(f"prompt file {path} does not exist")
        d = _parse_prompt_json(_load_json(path), str(path))
        d["name"] = path.stem
    elif path.suffix.lower() in (".yaml", ".yml"):
        if not path.is_file():
            raise SweepError(f"sweep file {path} does not exist")
        raw = _load_yaml(path)
        if not isinstance(raw, dict):
            raise SweepError(f"{path} must be a YAML mapping (model, suite or prompts, baseline, ...)")
        _check_keys(raw, _SWEEP_KEYS, str(path))
        d = {}
        if "suite" in raw and "prompts" in raw:
            raise SweepError(f"{path}: give either `suite` or `prompts`, not both")
        if "suite" in raw:
            d.update(_load_suite(str(raw["suite"])))
        if "prompts" in raw:
            pf = Path(str(raw["prompts"]))
            if not pf.is_absolute():
                pf = path.parent / pf
            sub = load_sweep(pf)
            d.update(system_prompts=sub.system_prompts, user_prompts=sub.user_prompts, baseline=sub.baseline,
                     metadata=sub.metadata, instruction_prefixes=sub.instruction_prefixes)
        if "system_prompts" in raw:
            d["system_prompts"] = _parse_system(raw["system_prompts"], str(path))
        if "user_prompts" in raw:
            d["user_prompts"] = _parse_user(raw["user_prompts"], str(path))
        if "instruction_prefixes" in raw:
            d["instruction_prefixes"] = _parse_prefixes(raw["instruction_prefixes"], str(path))
        for k, v in raw.items():
            if k in ("suite", "prompts", "system_prompts", "user_prompts", "description", "select",
                     "instruction_prefixes"):
                continue
            d[k] = v
        d["name"] = str(raw.get("name", path.stem))
        _apply_select(d, raw.get("select"), str(path))
    else:
        if path.exists():
            raise SweepError(f"{path}: a sweep must be a .yaml/.yml sweep file or a .json prompt file")
        d = _load_suite(arg)
    for k, v in overrides.items():
        if v is not None:
            d[k] = v
    d["source"] = arg
    try:
        return SweepConfig(**d)
    except TypeError as e:  # wrong value types reaching the dataclass
        raise SweepError(f"invalid sweep {arg}: {e}") from e


def _python_entries(items: Any, kind: str, key: str, cls_: type, parse, where: str) -> list:
    """Prompt entries given as Python objects -> validated SystemPrompt/UserPrompt list
    (instances pass through; texts and mappings are parsed like a sweep YAML's entries)."""
    if isinstance(items, str):
        items = [items]
    if isinstance(items, dict):
        items = [{key: str(k), "text": v} if isinstance(v, str) else {key: str(k), **v} for k, v in items.items()]
    if not isinstance(items, (list, tuple)):
        raise SweepError(f"{kind} prompts must be a dict, a list of texts or a list of mappings, "
                         f"got {type(items).__name__}")
    out = []
    for i, x in enumerate(items):
        if isinstance(x, cls_):
            out.append(x)
        else:
            out += parse([{key: f"{kind}_{i}", "text": x} if isinstance(x, str) else x], f"{where} ({kind} {i})")
    return out
