"""Request schemas of the HTTP API, with their documented bounds.

Owns validation only: shapes, ranges and names. Whether a vector exists or a layer is inside
the loaded model is checked by :mod:`steerlab.server.app`, which knows the model. The seed's
request fields (``prompt``, ``steering``, ``max_length``, ``temperature``) keep their names;
``steering`` accepts the seed's single vector name as well as a list of entries.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from ..defaults import REPETITION_PENALTY
from ..errors import PersonaError
from ..personas import NAME_PATTERN, check_name
from ..spec import DOSE_LIMIT
from .limits import (
    MAX_CONTENT_PARTS,
    MAX_CONTRAST_CHARS,
    MAX_CONTRAST_TEXTS,
    MAX_LAYERS_PER_ENTRY,
    MAX_MESSAGES,
    MAX_NEW_TOKENS,
    MAX_PROMPT_CHARS,
    MAX_VECTORS,
    STRENGTH_LIMIT,
)

NO_STEERING = {"", "none", "base"}  # the seed's page sent "none" for the unsteered model

VectorName = Annotated[str, StringConstraints(pattern=NAME_PATTERN.pattern)]
Strength = Annotated[float, Field(ge=-STRENGTH_LIMIT, le=STRENGTH_LIMIT)]
Layer = Annotated[int, Field(ge=0, le=4095, strict=True)]  # strict: JSON true is not layer 1
Dose = Annotated[float, Field(ge=-DOSE_LIMIT, le=DOSE_LIMIT)]
OperatorName = Literal["add", "add_norm", "target", "cap", "rotate"]
ReadNames = Annotated[list[VectorName] | None, Field(
    max_length=MAX_VECTORS,
    description="Vectors whose concept to read in the output, token by token, in neutral standard deviations "
                "(0 = typical neutral text; docs/glassbox.md). Omitted: nothing is read, no cost.")]


def check_steering(v: Any) -> Any:
    """Before validation: a name (the seed's form) or names become entries; "none"/""/"base"
    mean no steering; at most MAX_VECTORS entries."""
    if isinstance(v, str):
        return None if v.strip().lower() in NO_STEERING else [{"vector": v}]
    if isinstance(v, list):
        if len(v) > MAX_VECTORS:
            raise ValueError(f"at most {MAX_VECTORS} vectors at once, got {len(v)}")
        return [{"vector": x} if isinstance(x, str) else x for x in v]
    return v


class ConditionEntry(BaseModel):
    """Apply the entry only where another vector's reading holds (docs/glassbox.md)."""

    model_config = ConfigDict(extra="forbid")

    vector: VectorName = Field(description="The vector whose reading decides (see GET /vectors).")
    threshold: float = Field(1.0, ge=-100, le=100, description="Fires when the reading is >= this, in neutral "
                                                               "standard deviations (0 = typical neutral text).")
    stat: Literal["mean", "peak"] = Field("mean", description="Mean over the tokens, or the highest token.")
    on: Literal["prompt", "text"] = Field(
        "prompt", description="prompt: checked once on the prompt before generating (a row that does not fire is "
                              "exactly unsteered); text: re-checked at every token on the reply written so far.")


class SteerEntry(BaseModel):
    """One vector at one dose. Omitted fields fall back to the request's, then the vector's."""

    model_config = ConfigDict(extra="forbid")

    vector: VectorName = Field(description="Vector name (see GET /vectors).")
    strength: Strength | None = Field(
        None, description=f"Residual-norm units, {-STRENGTH_LIMIT:g}..{STRENGTH_LIMIT:g}; default: the vector's.")
    layers: list[Layer] | None = Field(
        None, min_length=1, max_length=MAX_LAYERS_PER_ENTRY,
        description="Layers to apply at (0..n_layers-1); default: the vector's default layers.")
    dose: Dose | None = Field(
        None, description="0 = no effect, 1 = the strongest setting measured fluent for this vector; past 1 the "
                          "text is expected to break. Give dose, strength or scale, not two.")
    scale: Strength | None = Field(None, description="Absolute scale on the unit direction (the seed's STRENGTH).")
    operator: OperatorName | None = Field(None, description="add, add_norm, target, cap or rotate (docs/dose.md); "
                                                            "default: the vector's.")
    positions: Literal["all", "prompt", "generated"] | Annotated[int, Field(ge=0, le=1_000_000)] | None = Field(
        None, description="Steer every position, the prompt's only, only generated ones, or positions >= N; "
                          "default: the vector's.")
    governor: bool | None = Field(None, description="Lower this row's steering while its text breaks; "
                                                    "default: the request's, then the vector's.")
    when: ConditionEntry | None = Field(None, description='Only when another vector reads high, e.g. {"vector": '
                                                          '"tabby_cats", "threshold": 1.0}; the answer\'s `applied` '
                                                          'says whether it fired.')


Steering = list[SteerEntry] | None


class _Sampling(BaseModel):
    """Fields shared by /generate and /compare."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="Text to continue or answer.")
    steering: Annotated[Steering, Field(
        description='A vector name ("weeknd", the seed\'s form), or up to 8 entries: names or '
                    '{"vector": "weeknd", "strength": 4, "layers": [12]}. "none" or null: no steering.')] = None
    strength: Strength | None = Field(
        None, description="Strength for every entry that gives no dose, strength or scale (residual-norm units).")
    dose: Dose | None = Field(None, description="Dose for every entry that gives no dose, strength or scale.")
    governor: bool | None = Field(None, description="Coherence governor for every entry that sets none.")
    max_length: int = Field(64, ge=1, le=MAX_NEW_TOKENS, description="New tokens to generate.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling (only when temperature > 0).")
    seed: int | None = Field(None, ge=0, le=2**32 - 1, description="Random seed: same seed, same sample.")
    repetition_penalty: float = Field(REPETITION_PENALTY, ge=1.0, le=2.0,
                                      description="1.0 = off; small models loop without it.")
    chat: bool | None = Field(None, description="Use the chat template (default: when the model has one).")
    positions: Literal["all", "prompt", "generated"] | None = Field(
        None, description="Steer every position, the prompt's only, or only generated ones (default: the vector's "
                          "setting).")
    stream: bool = Field(False, description="Stream tokens as server-sent events.")
    read: ReadNames = None

    @field_validator("steering", mode="before")
    @classmethod
    def _steering(cls, v: Any) -> Any:
        return check_steering(v)


class GenerateRequest(_Sampling):
    """POST /generate: one completion, steered by ``steering`` (or none)."""

    temperature: float = Field(0.7, ge=0.0, le=2.0, description="0 = greedy (deterministic).")


class CompareRequest(_Sampling):
    """POST /compare: base and steered completions of one prompt, in one batch."""

    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 = greedy, so only steering differs.")


class BuildRequest(BaseModel):
    """POST /vectors: build a persona vector from contrast lines."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="1-64 letters, digits, '_', '-' or '.', starting with a letter or digit.")
    positive: list[Annotated[str, StringConstraints(min_length=1, max_length=MAX_CONTRAST_CHARS)]] = Field(
        min_length=1, max_length=MAX_CONTRAST_TEXTS, description="Texts showing the concept.")
    negative: list[Annotated[str, StringConstraints(min_length=1, max_length=MAX_CONTRAST_CHARS)]] = Field(
        min_length=1, max_length=MAX_CONTRAST_TEXTS, description="Matching texts without it.")
    description: str = Field("", max_length=500)
    default_layers: list[Layer] | None = Field(None, min_length=1, max_length=MAX_LAYERS_PER_ENTRY,
                                               description="Default: the middle layer.")
    default_strength: Strength = 0.4
    method: Literal["mean_diff", "mean_centred", "pca", "probe"] = "mean_diff"
    overwrite: bool = Field(False, description="Replace an existing or built-in vector of that name.")

    @field_validator("name")
    @classmethod
    def _valid_name(cls, v: str) -> str:
        try:
            check_name(v)
        except PersonaError as exc:
            raise ValueError(str(exc)) from None
        if v != v.strip() or "\n" in v:  # NAME_PATTERN ends in "$", which also matches before a final newline
            raise ValueError(f"{v!r}: names are 1-64 letters, digits, '_', '-' or '.' (no spaces or newlines)")
        if v.lower() in NO_STEERING:
            raise ValueError(f"{v!r} means 'no steering' in requests; choose another name")
        return v

    @field_validator("positive", "negative")
    @classmethod
    def _not_blank(cls, v: list[str]) -> list[str]:
        lines = [s.strip() for s in v if s.strip()]
        if not lines:
            raise ValueError("needs at least one non-blank text")
        return lines


# ---- OpenAI-compatible chat ------------------------------------------------------------------
class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer"]
    content: Annotated[str, StringConstraints(max_length=MAX_PROMPT_CHARS)] | Annotated[
        list[dict[str, Any]], Field(max_length=MAX_CONTENT_PARTS)] = Field(
        description=f"Text (at most {MAX_PROMPT_CHARS} characters), or a list of {{type: text, text}} parts "
                    "(together at most as long).")

    @field_validator("content")
    @classmethod
    def _bounded(cls, v: Any) -> Any:
        if isinstance(v, list):
            size = sum(len(p["text"]) for p in v if isinstance(p, dict) and isinstance(p.get("text"), str))
            if size > MAX_PROMPT_CHARS:
                raise ValueError(f"the text parts hold {size} characters; at most {MAX_PROMPT_CHARS} per message")
        return v

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)


class ChatRequest(BaseModel):
    """POST /v1/chat/completions: OpenAI's chat schema plus ``steering``; unknown fields ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, max_length=200, description="Echoed back; the loaded model answers.")
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    temperature: float = Field(0.7, ge=0.0, le=2.0,
                               description="Default 0.7, as /generate (OpenAI's 1.0 makes small models sample noise).")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    n: int = Field(1, ge=1, le=1, description="Only 1 is supported.")
    stop: str | list[str] | None = Field(None, description="Not supported; must be omitted.")
    stream: bool = False
    stream_options: dict[str, Any] | None = Field(None, description='{"include_usage": true} adds a usage chunk.')
    steering: Annotated[Steering, Field(description="As in /generate.")] = None
    strength: Strength | None = None
    dose: Dose | None = None
    governor: bool | None = None
    read: ReadNames = None

    @field_validator("steering", mode="before")
    @classmethod
    def _steering(cls, v: Any) -> Any:
        return check_steering(v)

    @field_validator("stop")
    @classmethod
    def _no_stop(cls, v: Any) -> Any:
        if v:
            raise ValueError("stop sequences are not supported; omit 'stop'")
        return None

    @property
    def new_tokens(self) -> int:
        return self.max_completion_tokens or self.max_tokens or 256
