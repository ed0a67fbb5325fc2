"""The model's hyper-parameters, read from a Hugging Face ``config.json``.

Every check names the field at fault, so that a user converting an unsupported checkpoint learns exactly
which setting stands in the way.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

# Two families share the network: LLaMA (Llama 1-3.x, SmolLM, TinyLlama, ...) and Qwen2, which is LLaMA with
# biases on the q/k/v projections. model_type -> the architecture transformers names for it.
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES.values())
SUPPORTED_MODEL_TYPES = tuple(ARCHITECTURES)
# What transformers assumes for a field that config.json leaves out (LlamaConfig's and Qwen2Config's defaults).
_FAMILY_DEFAULTS = {"llama": dict(max_position_embeddings=2048, bos_token_id=1, eos_token_id=2),
                    "qwen2": dict(max_position_embeddings=32768, bos_token_id=None, eos_token_id=None)}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class ConfigError(ValueError):
    """A config.json that this project cannot serve; the message names the field."""


def _positive_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """A rotary-embedding frequency rewrite (``rope_scaling`` / ``rope_parameters`` of config.json).

    - ``linear``: every frequency divided by ``factor`` (positions interpolated).
    - ``llama3`` (Llama 3.1/3.2): wavelengths longer than original_max_position_embeddings / low_freq_factor are
      divided by ``factor``, those shorter than original_max_position_embeddings / high_freq_factor kept, those
      between blended smoothly.
    """
    rope_type: str
    factor: float
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None

    def __post_init__(self):
        if self.rope_type not in ("linear", "llama3"):
            raise ConfigError(f"config field 'rope_scaling' has rope_type {self.rope_type!r}; supported: "
                              f"{list(SUPPORTED_ROPE_TYPES)}")
        if not _positive_number(self.factor):
            raise ConfigError(f"config field 'rope_scaling' needs 'factor' > 0 for rope_type {self.rope_type!r}, "
                              f"got {self.factor!r}")
        object.__setattr__(self, "factor", float(self.factor))
        if self.rope_type != "llama3":  # linear reads only the factor (and so round-trips through config.json)
            for name in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
                object.__setattr__(self, name, None)
            return
        for name in ("low_freq_factor", "high_freq_factor"):
            value = getattr(self, name)
            if not _positive_number(value):
                raise ConfigError(f"config field 'rope_scaling' needs '{name}' > 0 for rope_type 'llama3', "
                                  f"got {value!r}")
            object.__setattr__(self, name, float(value))
        if not self.high_freq_factor > self.low_freq_factor:  # the blend divides by their difference
            raise ConfigError(f"config field 'rope_scaling' needs 'high_freq_factor' ({self.high_freq_factor}) > "
                              f"'low_freq_factor' ({self.low_freq_factor}) for rope_type 'llama3'")
        n = self.original_max_position_embeddings
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ConfigError(f"config field 'rope_scaling' needs 'original_max_position_embeddings', a positive "
                              f"integer, for rope_type 'llama3', got {n!r}")

    def to_hf_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


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
    # None: hidden_size / num_attention_heads (set so by __post_init__, so config.head_dim is always an int)
    head_dim: int | None = None
    # "llama" or "qwen2": the same network; Qwen2 always has q/k/v biases and never o_proj or MLP biases
    model_type: str = "llama"
    # biases on the q, k, v projections, and on o_proj for LLaMA (as LlamaConfig.attention_bias means)
    attention_bias: bool = False
    mlp_bias: bool = False  # biases on gate, up and down projections
    rope_scaling: RopeScaling | None = None  # None: plain rotary embeddings
    # every end-of-sequence id (Llama 3 lists several); eos_token_id is the first. () is filled from eos_token_id
    eos_token_ids: tuple[int, ...] = ()

    @property
    def num_query_groups(self) -> int:
        """How many query heads share one key/value head (1 = multi-head attention)."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def o_proj_bias(self) -> bool:
        """Whether the attention output projection has a bias: LLaMA's attention_bias covers it, Qwen2's not."""
        return self.attention_bias and self.model_type == "llama"

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"config field '{name}' must be a positive integer, got {value!r}")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(f"config field 'hidden_size' ({self.hidden_size}) must be divisible by "
                                  f"'num_attention_heads' ({self.num_attention_heads})")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if not isinstance(self.head_dim, int) or isinstance(self.head_dim, bool) or self.head_dim < 1:
            raise ConfigError(f"config field 'head_dim' must be a positive integer, got {self.head_dim!r}")
        if self.head_dim % 2:
            raise ConfigError(f"head dimension (config field 'head_dim', else hidden_size/num_attention_heads) = "
                              f"{self.head_dim} must be even for rotary embeddings")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"config field 'num_key_value_heads' ({self.num_key_value_heads}) must divide "
                              f"'num_attention_heads' ({self.num_attention_heads})")
        if not self.rope_theta > 0:
            raise ConfigError(f"config field 'rope_theta' must be > 0, got {self.rope_theta!r}")
        if not self.rms_norm_eps > 0:
            raise ConfigError(f"config field 'rms_norm_eps' must be > 0, got {self.rms_norm_eps!r}")
        if self.model_type not in ARCHITECTURES:
            raise ConfigError(f"config field 'model_type' must be one of {list(SUPPORTED_MODEL_TYPES)}, got "
                              f"{self.model_type!r}")
        if self.model_type == "qwen2" and (not self.attention_bias or self.mlp_bias):
            raise ConfigError("a Qwen2 model has biases on q/k/v only: config fields 'attention_bias' must be true "
                              f"and 'mlp_bias' false, got {self.attention_bias!r} and {self.mlp_bias!r}")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise ConfigError(f"config field 'rope_scaling' must be a RopeScaling or None, got {self.rope_scaling!r}")
        ids = tuple(self.eos_token_ids)
        if not ids and self.eos_token_id is not None:
            ids = (self.eos_token_id,)
        if any(not isinstance(i, int) or isinstance(i, bool) for i in ids):
            raise ConfigError(f"config field 'eos_token_id' must be an integer or a list of them, got {list(ids)}")
        if ids and ids[0] != self.eos_token_id:
            raise ConfigError(f"config field 'eos_token_id' ({self.eos_token_id!r}) must be the first of "
                              f"eos_token_ids {list(ids)}")
        object.__setattr__(self, "eos_token_ids", ids)

    # ---- Hugging Face config.json ----------------------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, raw: dict) -> "LlamaConfig":
        family = _family(raw)
        if raw.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"config field 'hidden_act' must be 'silu', got {raw['hidden_act']!r}")
        if raw.get("use_sliding_window"):
            raise ConfigError("config field 'use_sliding_window' is true: sliding-window attention is not "
                              "supported, only full attention")
        layer_types = raw.get("layer_types")
        if layer_types and set(layer_types) != {"full_attention"}:
            raise ConfigError(f"config field 'layer_types' ({sorted(set(layer_types))}) must be full_attention "
                              "only")
        for required in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                         "num_attention_heads"):
            if required not in raw:
                raise ConfigError(f"config.json lacks the required field '{required}'")
        defaults = _FAMILY_DEFAULTS[family]
        max_positions = raw.get("max_position_embeddings", defaults["max_position_embeddings"])
        rope_theta, rope_scaling = _rope(raw, max_positions)
        eos = raw.get("eos_token_id", defaults["eos_token_id"])
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        if family == "qwen2":  # Qwen2's attention always has q/k/v biases and its MLP none, whatever the fields say
            attention_bias, mlp_bias = True, False
        else:
            attention_bias, mlp_bias = bool(raw.get("attention_bias", False)), bool(raw.get("mlp_bias", False))
        return cls(
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=raw["num_attention_heads"],
            num_key_value_heads=raw.get("num_key_value_heads") or raw["num_attention_heads"],
            max_position_embeddings=max_positions,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            bos_token_id=raw.get("bos_token_id", defaults["bos_token_id"]),
            eos_token_id=eos_ids[0] if eos_ids else None,
            pad_token_id=raw.get("pad_token_id"),
            head_dim=raw.get("head_dim"),
            model_type=family,
            attention_bias=attention_bias,
            mlp_bias=mlp_bias,
            rope_scaling=rope_scaling,
            eos_token_ids=eos_ids,
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
        """A config.json that transformers loads as the same model and ``from_hf_dict`` reads back as ``self``."""
        fields = dataclasses.asdict(self)
        for derived in ("model_type", "rope_scaling", "eos_token_ids"):
            del fields[derived]
        if len(self.eos_token_ids) > 1:
            fields["eos_token_id"] = list(self.eos_token_ids)
        if self.model_type == "qwen2":  # implied by the architecture (Qwen2Config has neither field)
            del fields["attention_bias"], fields["mlp_bias"]
            fields["use_sliding_window"] = False
        if self.rope_scaling is not None:
            fields["rope_scaling"] = self.rope_scaling.to_hf_dict()
        return {
            "architectures": [ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "hidden_act": "silu",
            "torch_dtype": "float32",
            **fields,
        }


def _family(raw: dict) -> str:
    """The model_type whose network this config describes, from 'model_type' or else 'architectures'."""
    architectures = raw.get("architectures") or []
    model_type = raw.get("model_type")
    if model_type in ARCHITECTURES:
        return model_type
    for family, architecture in ARCHITECTURES.items():
        if architecture in architectures:
            return family
    raise ConfigError(
        f"unsupported architecture: config field 'architectures' is {architectures!r} and 'model_type' "
        f"is {model_type!r}; supported: architectures {list(SUPPORTED_ARCHITECTURES)}, "
        f"model_type {list(SUPPORTED_MODEL_TYPES)}")


def _rope(raw: dict, max_positions: int) -> tuple[float, RopeScaling | None]:
    """rope_theta and the scaling, read with transformers' precedence: 'rope_scaling' (older configs) over
    'rope_parameters' (transformers 5); the type from 'rope_type', else 'type'; rope_theta from that dict, else the
    top-level field; llama3's original_max_position_embeddings from a top-level field, else the dict, else
    max_position_embeddings (transformers' standardize_rope_params)."""
    field = "rope_scaling" if raw.get("rope_scaling") else "rope_parameters"
    params = raw.get(field) or {}
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        raise ConfigError(f"config field '{field}' must be one dict of rotary parameters (per-layer-type rotary "
                          f"parameters are not supported), got {params!r}")
    rope_theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    partial = params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ConfigError(f"config field 'partial_rotary_factor' ({partial!r}) is not supported: rotary embeddings "
                          "must span the whole head")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"config field '{field}' has rope_type {rope_type!r}, which is not supported; "
                          f"supported: {list(SUPPORTED_ROPE_TYPES)}")
    if rope_type == "default":
        return rope_theta, None
    original = raw.get("original_max_position_embeddings",
                       params.get("original_max_position_embeddings", max_positions))
    try:
        if rope_type == "linear":
            return rope_theta, RopeScaling("linear", params.get("factor"))
        return rope_theta, RopeScaling("llama3", params.get("factor"), params.get("low_freq_factor"),
                                       params.get("high_freq_factor"), original)
    except ConfigError as exc:  # name the field as this config.json spells it
        raise ConfigError(str(exc).replace("'rope_scaling'", f"'{field}'")) from None
