"""Each SFT loss's parameters, a pydantic model per loss: defaults, types and ranges, checked
when a config is read. No torch here, so that reading a config does not import it; the loss
functions (pipeline/losses/functions.py) take these parameters by the same names."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class LossParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)  # strict: 20.0 is not a top-K
    needs_reference: ClassVar[bool] = False  # the reverse KL to the starting model (EKSFT)


class CE(LossParams):
    """Cross-entropy on the completion tokens."""


class DFT(LossParams):
    """Dynamic fine-tuning: each token's CE weighted by its (detached) probability."""


class EAFT(LossParams):
    """Entropy-adaptive fine-tuning: each token's CE weighted by its normalised top-K entropy."""

    topk: int = Field(20, ge=2, description="K of the top-K entropy")
    alpha: float = Field(1.0, ge=0, description="exponent of the entropy weight")


class Masked(LossParams):
    """CE without the confident conflicts: tokens in the lowest `quantile` of both entropy and log p(y)."""

    quantile: float = Field(0.15, ge=0, le=1)


class EKSFT(LossParams):
    """CE on the tokens kept by entropy and KL masks, plus entropy and KL regularisers."""

    needs_reference: ClassVar[bool] = True
    ratio: float = Field(0.2, ge=0, le=1, description="share of tokens each mask selects")
    union: bool = Field(True, description="mask the union of the high-entropy and high-KL tokens, else their "
                        "intersection")
    lambda_entropy: float = Field(0.05, ge=0)
    lambda_kl: float = Field(0.05, ge=0)
    normalize: Literal["kept", "all"] = Field("kept", description="average over the kept tokens, or all of them")


class GEM(LossParams):
    """GEM: CE with the entropy-regularised game's per-token weights."""

    beta: float = Field(0.7, gt=0)
    h: Literal["linear", "logsigmoid"] = "linear"


LOSS_PARAMS: dict[str, type[LossParams]] = {"ce": CE, "dft": DFT, "eaft": EAFT, "masked": Masked, "eksft": EKSFT,
                                            "gem": GEM}


def loss_params(name: str, **params: Any) -> dict[str, Any]:
    """The loss's parameters, checked, with its defaults filled in (what it runs with)."""
    if name not in LOSS_PARAMS:
        raise ValueError(f"unknown loss {name!r}; allowed: {sorted(LOSS_PARAMS)}")
    model = LOSS_PARAMS[name]
    unknown = set(params) - set(model.model_fields)
    if unknown:
        raise ValueError(f"unknown parameter(s) {sorted(unknown)} for loss {name!r}; "
                         f"allowed: {sorted(model.model_fields)}")
    try:
        return model(**params).model_dump()
    except ValidationError as error:
        first = error.errors()[0]
        key = first["loc"][0]
        raise ValueError(f"loss {name!r}: {key}={params[key]!r} is invalid ({first['msg'][0].lower()}"
                         f"{first['msg'][1:]})") from None
