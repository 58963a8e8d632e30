"""Configuration of the ProSeCo DiT for Hugging Face (`trust_remote_code=True`).

The keys are those of the checkpoints that the ProSeCo and MDLM authors publish on the Hugging
Face hub (kuleshov-group/proseco-owt, kuleshov-group/mdlm-owt), so their config.json loads here
and ours loads in their code. One key is ours: label_combination, how a class label joins the
time embedding (silu_sum, the reference's; sum_silu, this project's older checkpoints).
"""
import transformers


class ProsecoConfig(transformers.PretrainedConfig):
    model_type = "proseco"

    def __init__(self, vocab_size: int = 50258, model_length: int = 1024, hidden_dim: int = 768,
                 cond_dim: int = 128, n_blocks: int = 12, n_heads: int = 12, dropout: float = 0.1,
                 time_conditioning: bool = False, cfg: bool = False, cfg_num_classes: int = -1,
                 label_combination: str = "silu_sum", **kwargs):
        super().__init__(**kwargs)
        self.vocab_size = vocab_size
        self.model_length = model_length
        self.hidden_dim = hidden_dim
        self.cond_dim = cond_dim
        self.n_blocks = n_blocks
        self.n_heads = n_heads
        self.dropout = dropout
        self.time_conditioning = time_conditioning
        self.cfg = cfg
        self.cfg_num_classes = cfg_num_classes
        self.label_combination = label_combination
