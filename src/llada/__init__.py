"""llada: Large Language Diffusion Models (LLaDA) in PyTorch — model, checkpoints, sampling, fast generation, likelihood, training."""

from llada.diffusion.likelihood import LikelihoodEstimate, log_likelihood
from llada.diffusion.sampling import generate
from llada.engine.engine import Engine
from llada.engine.settings import Generation, GenerationSettings
from llada.model.config import PRESETS, ModelConfig, preset
from llada.model.transformer import LLaDAModel, ModelOutput

__all__ = ["PRESETS", "Engine", "Generation", "GenerationSettings", "LLaDAModel", "LikelihoodEstimate",
           "ModelConfig", "ModelOutput", "generate", "log_likelihood", "preset"]
__version__ = "0.1.0"
