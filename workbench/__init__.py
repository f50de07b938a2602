__version__ = "0.2.0"
from .core import private_inductor_dir
private_inductor_dir() # before transformers fixes torch's folder of compiled kernels (chapter 00)
