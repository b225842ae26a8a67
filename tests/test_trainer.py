"""The HF Trainer drives the AdaLoRA schedule through AdaLoraCallback (PEFT's never runs it)."""

import warnings

import torch
from torch.utils.data import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import adalora_fast as af


class Tokens(Dataset):
    def __init__(self, n=24):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 64, (n, 10), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_trainer_runs_schedule_to_target_budget(tmp_path):
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))
    cfg = af.AdaLoraConfig(init_r=4, target_r=2, tinit=2, tfinal=3, deltaT=2, total_step=12,
                           target_modules=["q_proj", "v_proj"])
    model = af.get_peft_model(base, cfg)
    seen = []
    orig = model.update_and_allocate
    model.update_and_allocate = lambda step: (seen.append(step), orig(step))[1]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=12,
                             learning_rate=1e-2, report_to=[], save_strategy="no", logging_strategy="no",
                             use_cpu=True, disable_tqdm=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[af.AdaLoraCallback(model)]).train()
    assert seen == list(range(12))
    rp = model.rank_pattern
    assert rp is not None and len(rp) == 4
    assert sum(sum(v) for v in rp.values()) == 2 * 4
    for (name, m), v in zip(model.adapted_layers(), rp.values()):
        E = m.lora_E["default"].detach().view(-1)
        assert torch.all(E[~torch.tensor(v)] == 0), name


def test_callback_rejects_a_plain_model():
    import pytest

    with pytest.raises(TypeError, match="AdaLoraModel"):
        af.AdaLoraCallback(torch.nn.Linear(2, 2))
