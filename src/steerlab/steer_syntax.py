"""The ``--steer`` syntax: ``NAME[:key=value...]`` -> a :class:`~steerlab.spec.Steer` (and back to a line).

Owns the keys (dose, strength, scale, op, positions, governor, and the condition: if, stat, on)
and how command-wide options (--dose, --layer, --operator ...) fill what an entry leaves out.
Knows nothing about generation.
"""

from __future__ import annotations

import click

from .errors import SteeringError

STEER_HELP = ("Vector to apply (repeatable): NAME, NAME:dose=0.5, NAME:0.3 (a strength) or "
              "NAME:dose=0.5:op=target:governor=on. Only when another vector reads high: "
              "NAME:if=OTHER:threshold=1.0 (OTHER's mean reading of the prompt >= 1.0, in neutral standard "
              "deviations; also written 'NAME:if=OTHER>=1.0', quoted for the shell), with :stat=peak (the "
              "highest token instead of the mean) and :on=text (re-checked on the reply while it is written, "
              "instead of once on the prompt); docs/glassbox.md.")


_STEER_KEYS = {"dose": "dose", "strength": "strength", "s": "strength", "scale": "scale", "op": "operator",
               "operator": "operator", "positions": "positions", "governor": "governor", "if": "when",
               "when": "when", "threshold": "when_threshold", "th": "when_threshold", "stat": "when_stat",
               "on": "when_on"}
_STEER_HELP = ("use NAME, NAME:STRENGTH or NAME:dose=0.5[:op=add|add_norm|target|cap|rotate][:governor=on|off]"
               "[:if=OTHER[:threshold=X][:stat=mean|peak][:on=prompt|text]]")


def parse_steer(spec: str) -> tuple[str, dict]:
    """``name``, ``name:strength`` or ``name:key=value[:key=value...]`` (dose, strength, scale, op, positions,
    governor, if, threshold, stat, on). A condition comes back as ``when=(other name, inline threshold or
    None)`` plus ``when_threshold`` / ``when_stat`` / ``when_on``: the caller looks the other vector up."""
    name, *parts = spec.split(":")
    fields: dict = {}
    try:
        for part in parts:
            key, eq, value = part.partition("=")
            if not eq:
                fields["strength"] = float(key)
                continue
            field = _STEER_KEYS[key.strip().lower()]
            if field in ("dose", "strength", "scale", "when_threshold"):
                fields[field] = float(value)
            elif field == "governor":
                fields[field] = value.strip().lower() in ("1", "on", "true", "yes")
            elif field == "positions":
                from .spec import parse_positions

                fields[field] = parse_positions(value)
            elif field == "when":
                from .spec import parse_when

                fields[field] = parse_when(value)
            else:
                fields[field] = value.strip()
    except (ValueError, KeyError, SteeringError):
        raise click.BadParameter(f"{spec!r}: {_STEER_HELP}, e.g. weeknd:dose=0.5", param_hint="--steer") from None
    if not name:
        raise click.BadParameter(f"{spec!r}: {_STEER_HELP}", param_hint="--steer")
    return name, fields


def steering_from_options(lm, store, kw: dict) -> list:  # noqa: ANN001
    """--steer entries as Steer specs: each entry's own fields > --dose/--strength/--scale and friends."""
    from .layers import parse_layers
    from .spec import Steer, When, parse_positions

    if not kw["steers"]:
        raise click.UsageError("give at least one --steer NAME (see `steerlab list`)")
    layers = tuple(parse_layers(kw["layer_spec"], lm.n_layers)) if kw["layer_spec"] else None
    shared = {k: kw[k] for k in ("dose", "strength", "scale") if kw.get(k) is not None}
    if len(shared) > 1:
        given = " and ".join("--" + k for k in shared)
        raise click.UsageError(f"give one of --dose, --strength or --scale, not {given}")
    out = []
    for spec in kw["steers"]:
        name, fields = parse_steer(spec)
        if not any(k in fields for k in ("dose", "strength", "scale")):
            fields |= shared
        fields.setdefault("operator", kw.get("operator"))
        if kw.get("governor") is not None:
            fields.setdefault("governor", kw["governor"])
        if kw.get("positions") is not None:
            fields.setdefault("positions", parse_positions(kw["positions"]))
        cond = {k.removeprefix("when_"): fields.pop(k) for k in ("when_threshold", "when_stat", "when_on")
                if k in fields}
        if "when" in fields:
            other, inline = fields.pop("when")
            if inline is not None and "threshold" in cond:
                raise click.BadParameter(f"{spec!r}: give the threshold once (OTHER>=X or threshold=X)",
                                         param_hint="--steer")
            fields["when"] = When(store.get(other), **({"threshold": inline} if inline is not None else {}), **cond)
        elif cond:
            raise click.BadParameter(f"{spec!r}: threshold=, stat= and on= belong to a condition: add if=OTHER",
                                     param_hint="--steer")
        out.append(Steer(store.get(name), layers=layers, **fields))
    return out


def describe_steering(steering, lm) -> str:  # noqa: ANN001
    from .spec import resolve

    parts = []
    for st in steering:
        r = resolve(st, lm.n_layers).describe()
        amount = f"dose {r['dose']} = strength {r['strength']:.3g}" if "dose" in r else \
            f"scale {r['scale']}" if "scale" in r else f"strength {r['strength']:.3g}"
        extra = ("" if str(r["positions"]) == "all" else f", positions {r['positions']}") + \
            (", governor" if r["governor"] else "") + (f"; {r['note']}" if "note" in r else "")
        if "when" in r:
            w = r["when"]
            extra += f", only when the {w['on']} reads {w['vector']} {w['stat']} >= {w['threshold']:g}"
        parts.append(f"{r['vector']} ({r['operator']}, {amount}, layers {','.join(map(str, r['layers']))}{extra})")
    return " + ".join(parts)


def describe_conditions(report: dict) -> list[str]:
    """One line per conditioned entry of ``generate(report=)``: what was read and whether it fired."""
    lines = []
    for row in report.get("conditions", []):
        for c in row:
            head = f"{c['vector']} if the {c['on']}'s {c['stat']} {c['if']} reading >= {c['threshold']:g}"
            if c["on"] == "prompt":
                lines.append(f"{head}: {c['value']:.2f}, {'fired' if c['fired'] else 'did not fire (not steered)'}")
            elif c["fired"]:
                lines.append(f"{head}: fired from reply token {c['first_steered_token']}, "
                             f"steered {c['steered_tokens']} of {c['tokens_read']} tokens read")
            else:
                lines.append(f"{head}: never fired in {c['tokens_read']} tokens (not steered)")
    return lines
