"""LoraConfig: the adapter settings ``modulora.load`` attaches to every targeted linear."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator


class LoraConfig(BaseModel):
    """LoRA hyper-parameters. ``scaling = alpha / r`` as in PEFT.

    ``target_modules``: None = every ``nn.Linear`` inside the decoder blocks (never embeddings or lm_head);
    a list of name suffixes (PEFT semantics: ``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``);
    a string regex matched against full module names with ``re.fullmatch``; or ``"all-linear"``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    r: int = Field(8, ge=1, description="LoRA rank")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha; the update is scaled by alpha / r")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the LoRA input")
    target_modules: list[str] | str | None = Field(
        None, description="which linears to quantize + adapt (None: all linears of the decoder blocks)"
    )

    @field_validator("target_modules")
    @classmethod
    def _nonempty(cls, v: list[str] | str | None) -> list[str] | str | None:
        if isinstance(v, list) and not v:
            raise ValueError("target_modules is an empty list; give module names, a regex, or None")
        return v

    @property
    def scaling(self) -> float:
        return self.alpha / self.r
