"""The model's hyper-parameters, read from a Hugging Face ``config.json``.

Every check names the field at fault, so that a user converting an unsupported checkpoint learns exactly
which setting stands in the way.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
SUPPORTED_MODEL_TYPES = ("llama",)


class ConfigError(ValueError):
    """A config.json that this project cannot serve; the message names the field."""


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_query_groups(self) -> int:
        """How many query heads share one key/value head (1 = multi-head attention)."""
        return self.num_attention_heads // self.num_key_value_heads

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"config field '{name}' must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"config field 'hidden_size' ({self.hidden_size}) must be divisible by "
                              f"'num_attention_heads' ({self.num_attention_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head dimension hidden_size/num_attention_heads = {self.head_dim} must be even "
                              "for rotary embeddings")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"config field 'num_key_value_heads' ({self.num_key_value_heads}) must divide "
                              f"'num_attention_heads' ({self.num_attention_heads})")
        if not self.rope_theta > 0:
            raise ConfigError(f"config field 'rope_theta' must be > 0, got {self.rope_theta!r}")
        if not self.rms_norm_eps > 0:
            raise ConfigError(f"config field 'rms_norm_eps' must be > 0, got {self.rms_norm_eps!r}")

    # ---- Hugging Face config.json ----------------------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, raw: dict) -> "LlamaConfig":
        architectures = raw.get("architectures") or []
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES and not set(architectures) & set(SUPPORTED_ARCHITECTURES):
            raise ConfigError(
                f"unsupported architecture: config field 'architectures' is {architectures!r} and 'model_type' "
                f"is {model_type!r}; supported: architectures {list(SUPPORTED_ARCHITECTURES)}, "
                f"model_type {list(SUPPORTED_MODEL_TYPES)}")
        if raw.get("rope_scaling"):
            raise ConfigError(f"config field 'rope_scaling' ({raw['rope_scaling']!r}) is not supported; "
                              "only plain rotary embeddings are")
        if raw.get("attention_bias") or raw.get("mlp_bias"):
            raise ConfigError("config fields 'attention_bias'/'mlp_bias' must be false: biased projections "
                              "are not supported")
        if raw.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"config field 'hidden_act' must be 'silu', got {raw['hidden_act']!r}")
        head_dim = raw.get("head_dim")
        if head_dim is not None and head_dim * raw.get("num_attention_heads", 0) != raw.get("hidden_size"):
            raise ConfigError(f"config field 'head_dim' ({head_dim}) must equal hidden_size/num_attention_heads")
        for required in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                         "num_attention_heads"):
            if required not in raw:
                raise ConfigError(f"config.json lacks the required field '{required}'")
        eos = raw.get("eos_token_id", 2)
        if isinstance(eos, list):  # several end ids: the first one is the model's end-of-sequence
            eos = eos[0] if eos else None
        rope_theta = raw.get("rope_theta")
        if rope_theta is None:  # newer transformers keep it under rope_parameters
            rope_theta = (raw.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        return cls(
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=raw["num_attention_heads"],
            num_key_value_heads=raw.get("num_key_value_heads") or raw["num_attention_heads"],
            max_position_embeddings=raw.get("max_position_embeddings", 2048),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            bos_token_id=raw.get("bos_token_id", 1),
            eos_token_id=eos,
            pad_token_id=raw.get("pad_token_id"),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> "LlamaConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise ConfigError(f"no config.json at {path}")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
        return cls.from_hf_dict(raw)

    def to_hf_dict(self) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "torch_dtype": "float32",
            **dataclasses.asdict(self),
        }
