"""llada: Large Language Diffusion Models (LLaDA) in PyTorch — model, checkpoints, sampling, fast generation, likelihood, training."""

from llada.config import PRESETS, ModelConfig, preset
from llada.engine import Engine, Generation, GenerationSettings
from llada.likelihood import LikelihoodEstimate, log_likelihood
from llada.model import LLaDAModel, ModelOutput
from llada.sampling import generate

__all__ = ["PRESETS", "Engine", "Generation", "GenerationSettings", "LLaDAModel", "LikelihoodEstimate",
           "ModelConfig", "ModelOutput", "generate", "log_likelihood", "preset"]
__version__ = "0.1.0"
