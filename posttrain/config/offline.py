"""The offline objectives' sections: dpo (each preference kind's options declared once, by its loss), reward, kto; the
DPO-family presets."""

from __future__ import annotations

from pydantic import Field, model_validator

from posttrain.sections import Section

# The options of the preference kinds. Each kind takes the ones its loss function declares (its keyword-only
# arguments in posttrain.losses, with their defaults there, once); an option the chosen kind does not take
# is a config error, and the resolved config holds the chosen kind's options only.
KIND_OPTION_FIELDS = ("label_smoothing", "gamma", "tau", "delta")


class PreferenceOptions(Section):
    """DPO family (section `dpo`, also read by `algorithm: orpo` and `algorithm: simpo`)."""

    kind: str = Field(
        "sigmoid", description="Loss kind: sigmoid (DPO), ipo, hinge, robust, ..., simpo, orpo."
    )
    beta: float = Field(0.1, gt=0, description="Inverse temperature of the implicit reward (KL strength).")
    label_smoothing: float | None = Field(
        None, ge=0, lt=0.5, description="Assumed label noise (sigmoid = cDPO, robust, exo_pair, aot, simpo)."
    )
    gamma: float | None = Field(None, ge=0, description="SimPO's target reward margin.")
    tau: float | None = Field(None, gt=0, description="DiscoPOP's temperature.")
    delta: float | None = Field(None, description="BCO's reward shift.")
    sft_weight: float = Field(
        0.0,
        ge=0,
        description="Weight of the chosen completions' NLL added to the loss (RPO; ORPO's lambda is 1).",
    )
    ref_model: str | None = Field(None, description="Reference model path; default: the model as loaded.")

    @model_validator(mode="before")
    @classmethod
    def _options_of_the_kind(cls, raw):
        """Fill in the chosen kind's option defaults; refuse options it does not take."""
        if not isinstance(raw, dict):
            return raw
        from posttrain.losses import kind_option_defaults

        kind = raw.get("kind", "sigmoid")
        defaults = kind_option_defaults(kind)  # an unknown kind: the list of kinds and a did-you-mean
        wrong = [k for k in KIND_OPTION_FIELDS if raw.get(k) is not None and k not in defaults]
        if wrong:
            takes = ", ".join(["beta", *defaults, "sft_weight", "ref_model"])
            raise ValueError(f"kind {kind!r} does not take {', '.join(wrong)}; {kind!r} takes: {takes}")
        return {**defaults, **{k: v for k, v in raw.items() if v is not None or k not in defaults}}

    @model_validator(mode="after")
    def _options_in_range(self) -> PreferenceOptions:
        """The loss function checks its own options (exo_pair's ε > 0, DiscoPOP's τ, ...): ask it now, on
        one dummy pair, so that a bad value is a config error at load time, not a crash at the first step
        after the reference pass."""
        import torch

        from posttrain.losses import REFERENCE_FREE_KINDS, preference_loss

        zero, one = torch.zeros(1), torch.ones(1)
        ref = () if self.kind in REFERENCE_FREE_KINDS else (zero, zero)
        lengths = {"chosen_lengths": one, "rejected_lengths": one}
        preference_loss(self.kind, -one, -one, *ref, beta=self.beta, **self.kind_options(**lengths))
        return self

    def kind_options(self, **lengths) -> dict:
        """The options `preference_loss` takes for this kind (lengths only where used)."""
        from posttrain.losses import kind_options

        values = {k: getattr(self, k) for k in KIND_OPTION_FIELDS} | lengths
        return {k: values[k] for k in kind_options(self.kind)}


class RewardOptions(Section):
    """Reward model (Bradley-Terry on preference pairs)."""

    margin: float = Field(0.0, ge=0, description="Required score gap: -log sigmoid(r_c - r_r - margin).")
    center_coef: float = Field(0.0, ge=0, description="Weight of (r_c + r_r)^2, keeping scores centred at 0.")


class KTOOptions(Section):
    """KTO (unpaired desirable / undesirable feedback)."""

    beta: float = Field(0.1, gt=0)
    desirable_weight: float = Field(
        1.0, gt=0, description="lambda_D; balance lambda_D*n_D / (lambda_U*n_U) in [1, 4/3]."
    )
    undesirable_weight: float = Field(1.0, gt=0, description="lambda_U.")


# algorithm: presets of the `dpo` section it implies
PREFERENCE_PRESETS = {
    "dpo": {},
    "orpo": {"kind": "orpo", "sft_weight": 1.0},
    "simpo": {"kind": "simpo", "beta": 2.0},
}
