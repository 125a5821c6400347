"""Task heads through transformers' generic heads, registered with the Auto classes on `import kvshift`."""

from __future__ import annotations

import torch
from builders import tiny_config, tiny_model
from transformers import (
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from kvshift import (
    KVShiftForQuestionAnswering,
    KVShiftForSequenceClassification,
    KVShiftForTokenClassification,
)


def test_auto_classes_build_the_kvshift_heads():
    c = tiny_config(num_labels=3)
    assert type(AutoModelForSequenceClassification.from_config(c)) is KVShiftForSequenceClassification
    assert type(AutoModelForTokenClassification.from_config(c)) is KVShiftForTokenClassification
    assert type(AutoModelForQuestionAnswering.from_config(c)) is KVShiftForQuestionAnswering


def test_sequence_classification_pools_the_last_real_token_and_trains_the_shift():
    torch.manual_seed(0)
    m = KVShiftForSequenceClassification(tiny_config(num_labels=3)).eval()
    ids = torch.randint(3, 97, (2, 6))
    padded = ids.clone()
    padded[1, 4:] = 0  # right padding with pad_token_id 0
    with torch.no_grad():
        out = m(padded, attention_mask=(padded != 0).long()).logits
        alone = m(ids[1:, :4]).logits
    assert out.shape == (2, 3)
    assert torch.allclose(out[1], alone[0], atol=1e-5)
    m.train()
    loss = m(ids, labels=torch.tensor([0, 2])).loss
    loss.backward()
    assert m.model.layers[0].self_attn.k_shift.grad.abs().sum() > 0


def test_token_classification_and_qa_shapes(tmp_path):
    lm = tiny_model()
    lm.save_pretrained(tmp_path)
    tok = AutoModelForTokenClassification.from_pretrained(tmp_path, num_labels=5).eval()
    qa = AutoModelForQuestionAnswering.from_pretrained(tmp_path).eval()
    # the decoder weights (shift included) come from the causal-LM checkpoint
    assert torch.equal(tok.model.layers[1].self_attn.v_shift, lm.model.layers[1].self_attn.v_shift)
    assert torch.equal(qa.model.embed_tokens.weight, lm.model.embed_tokens.weight)
    ids = torch.randint(3, 97, (2, 7))
    with torch.no_grad():
        assert tok(ids).logits.shape == (2, 7, 5)
        out = qa(ids)
    assert out.start_logits.shape == out.end_logits.shape == (2, 7)
