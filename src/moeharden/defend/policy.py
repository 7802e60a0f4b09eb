"""The selective fine-tuning policy: which parameter groups licensees may adapt, and how.

A policy file is data (YAML, ``version: 1``, validated; every problem listed at once)::

    version: 1
    license: apache-2.0
    permitted_uses: "Research and evaluation; no redistribution of pruned derivatives."
    contact: security@example.com
    groups:
      experts: frozen
      router: frozen
      shared_experts: frozen
      attention: {lora: {max_rank: 16}}  # or the quoted string "lora(max_rank: 16)"
      embeddings: frozen
      norms: trainable
      lm_head: frozen

Groups are the registry's (``experts``, ``router``, ``shared_experts``, ``attention``,
``embeddings``, ``norms``, ``lm_head``, ``other``); a group left out is ``frozen``.
:func:`apply` enforces a policy on a loaded model during authorised fine-tuning.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from moeharden.errors import ConfigFileError, PolicyViolation, validation_problems
from moeharden.model.registry import GROUPS

_LORA = re.compile(r"^\s*lora\s*\(\s*max_rank\s*:\s*(\d+)\s*\)\s*$")


class LoraRule(BaseModel):
    """The ``{lora: {max_rank: N}}`` form of a LoRA rule."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    max_rank: int = Field(gt=0)


class Rule(BaseModel):
    """How one group may be adapted: ``frozen``, ``trainable``, or LoRA up to a rank."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    mode: Literal["frozen", "trainable", "lora"]
    max_rank: int | None = None

    def describe(self) -> str:
        """The rule as written in a policy file (``frozen``, ``trainable``, ``lora(max_rank: N)``)."""
        return f"lora(max_rank: {self.max_rank})" if self.mode == "lora" else self.mode


class Policy(BaseModel):
    """A validated policy (see the module docstring)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    version: Literal[1] = 1
    license: str
    permitted_uses: str
    contact: str
    groups: dict[Literal[GROUPS], Rule]  # type: ignore[valid-type]

    @field_validator("groups", mode="before")
    @classmethod
    def _rules(cls, v: Any) -> Any:
        if not isinstance(v, dict):
            return v
        out = {}
        for k, r in v.items():
            if isinstance(r, str):
                m = _LORA.match(r)
                if r.strip() in ("frozen", "trainable"):
                    r = {"mode": r.strip()}
                elif m:
                    r = {"mode": "lora", "max_rank": int(m.group(1))}
                else:
                    raise ValueError(f"group {k!r}: {r!r} is not frozen, trainable or lora(max_rank: N)")
            elif isinstance(r, dict) and set(r) == {"lora"}:
                lo = LoraRule(**(r["lora"] or {}))
                r = {"mode": "lora", "max_rank": lo.max_rank}
            out[k] = r
        return out

    def rule(self, group: str) -> Rule:
        """The rule of ``group`` (a group the policy leaves out is ``frozen``)."""
        return self.groups.get(group, Rule(mode="frozen"))

    def to_json(self) -> dict:
        """The policy as recorded in a manifest: rules in their written form, groups sorted."""
        return {"version": self.version, "license": self.license, "permitted_uses": self.permitted_uses,
                "contact": self.contact, "groups": {g: r.describe() for g, r in sorted(self.groups.items())}}


def parse_policy(raw: Any, where: str = "policy") -> Policy:
    """Validate a policy mapping.

    Raises:
        ConfigFileError: every problem at once, with field paths.
    """
    if not isinstance(raw, dict):
        raise ConfigFileError(f"{where} must be a mapping with version, license, permitted_uses, contact, groups.")
    try:
        return Policy(**raw)
    except ValidationError as err:
        lines = validation_problems(err)
        raise ConfigFileError(f"{where} has {len(lines)} problem(s): " + "; ".join(lines),
                              hint=f"Groups are {', '.join(GROUPS)}; rules are frozen, trainable or "
                                   "lora(max_rank: N). See docs/policy.md.") from None


def load_policy(path: Path) -> Policy:
    """Read and validate a policy YAML file (``yaml.safe_load``: data only).

    Raises:
        ConfigFileError: missing file, bad YAML, invalid fields.
    """
    from moeharden.io.files import load_yaml_data, read_small_text  # regular files only, bounded, no aliases

    text = read_small_text(Path(path), what="policy file", error=ConfigFileError)
    raw = load_yaml_data(text, where=f"Policy file {path}", error=ConfigFileError)
    return parse_policy(raw, where=f"Policy file {path}")


def _digest(p: torch.Tensor) -> torch.Tensor:
    """A cheap value fingerprint of a tensor (sum, sum of squares, strided sum), float64 on CPU."""
    x = p.detach().reshape(-1).double()
    return torch.stack([x.sum(), (x * x).sum(), x[::97].sum()]).cpu()


class PolicyGuard:
    """Enforces a policy on a model: frozen groups stay frozen and unchanged; adapters stay within
    the groups and ranks the policy allows. Returned by :func:`apply`; call :meth:`check` at will
    (every forward pass checks ``requires_grad`` and adapters automatically)."""

    def __init__(self, model, policy: Policy):
        from moeharden.model.registry import parameter_groups

        self.model, self.policy = model, policy
        self.group_of: dict[str, str] = {n: g for g, names in parameter_groups(None, model).items() for n in names}
        params = dict(model.named_parameters())
        self.frozen = {n: params[n] for n, g in self.group_of.items() if policy.rule(g).mode != "trainable"}
        self.digests = {n: _digest(p) for n, p in self.frozen.items()}
        self.handles = []
        for n, p in self.frozen.items():
            if p.requires_grad:   # hooks can only be registered on tensors that require grad
                self.handles.append(p.register_post_accumulate_grad_hook(
                    lambda _p, n=n: self._fail(f"a gradient reached frozen parameter {n}", n)))
            p.requires_grad_(False)
        self.handles.append(model.register_forward_pre_hook(lambda *_: self.check(values=False)))

    def _fail(self, what: str, name: str | None = None) -> None:
        group = self.group_of.get(name or "", "")
        where = f" (group {group} is {self.policy.rule(group).describe()})" if group else ""
        raise PolicyViolation(f"Policy violation: {what}{where}.",
                              hint="The release's selective fine-tuning policy forbids this; see its model card.")

    def check(self, values: bool = True) -> None:
        """Raise :class:`PolicyViolation` if a frozen parameter requires grad or changed, or an
        adapter sits outside what the policy allows."""
        for n, p in self.frozen.items():
            if p.requires_grad:
                self._fail(f"requires_grad was set on frozen parameter {n}", n)
        if values:
            for n, p in self.frozen.items():
                if not torch.allclose(_digest(p), self.digests[n], rtol=0, atol=0):
                    self._fail(f"the values of frozen parameter {n} changed", n)
        for name, mod in self.model.named_modules():
            lora_a = getattr(mod, "lora_A", None)
            if not lora_a:
                continue
            base = name
            group = next((g for n, g in self.group_of.items() if n.startswith(name + ".") and "lora_" not in n),
                         "other")
            rule = self.policy.rule(group)
            ranks = [m.out_features for m in lora_a.values()] if hasattr(lora_a, "values") else []
            if rule.mode == "frozen":
                self._fail(f"a LoRA adapter was attached to {base} in group {group}")
            if rule.mode == "lora" and any(r > (rule.max_rank or 0) for r in ranks):
                self._fail(f"a LoRA adapter of rank {max(ranks)} > {rule.max_rank} was attached to {base}")

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def apply(model, policy: Policy | Path | dict) -> PolicyGuard:
    """Enforce ``policy`` on ``model`` for authorised fine-tuning (see :class:`PolicyGuard`).

    Freezes every parameter of a group that is not ``trainable`` (LoRA groups: the base weights),
    then guards: a forward pass raises :class:`PolicyViolation` when a frozen parameter requires
    grad or an adapter breaks the policy, a gradient reaching a frozen parameter raises, and
    ``guard.check()`` also detects changed values.
    """
    if isinstance(policy, (str, Path)):
        policy = load_policy(Path(policy))
    elif isinstance(policy, dict):
        policy = parse_policy(policy)
    return PolicyGuard(model, policy)
