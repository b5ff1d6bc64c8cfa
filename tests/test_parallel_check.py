"""Static semi-auto-parallel check: full-size DeepSeek-Coder layouts, and bad ones named precisely."""
import pytest

from mindformers_ext.parallel import ParallelCheckError, build_skeleton, check_parallel
from research.deepseek1_5 import DeepSeekCoderConfig, DeepSeekCoderForCausalLM


def _model(preset="deepseek-coder-7b-v1.5", **parallel):
    parallel = {"data_parallel": 1, "model_parallel": 1, "pipeline_stage": 1, "micro_batch_num": 1, **parallel}
    config = DeepSeekCoderConfig.from_preset(preset, seq_length=4096, batch_size=1, parallel_config=parallel)
    return build_skeleton(DeepSeekCoderForCausalLM, config)


def test_seed_finetune_layout_passes():
    """7B v1.5 finetune as the seed: 8 cards, dp 1 x mp 8; also dp 2 x mp 4 and 2 pipeline stages on 16."""
    summary = check_parallel(_model(model_parallel=8), 8)
    assert "dp=1 mp=8 pp=1" in summary[0]
    check_parallel(_model(data_parallel=2, model_parallel=4), 8)
    check_parallel(_model(data_parallel=2, model_parallel=4, pipeline_stage=2, micro_batch_num=4), 16)


def test_device_count_mismatch_is_reported():
    with pytest.raises(ParallelCheckError, match=r"= 8, but the job has 16 devices"):
        check_parallel(_model(data_parallel=2, model_parallel=4), 16)


def test_indivisible_heads_name_the_layer_and_dimension():
    """32 heads of 128 split 3 ways: q projection output 4096 is not divisible by 3."""
    with pytest.raises(ParallelCheckError) as err:
        check_parallel(_model(model_parallel=3), 3)
    text = str(err.value)
    assert "model.layers.0.attention.wq.matmul: input 1 dimension 0 (4096 = 4096) is not divisible by its split 3" in text
    assert "feed_forward.w1" in text  # FFN 11008 is not divisible by 3 either


def test_gqa_kv_heads_limit_model_parallel():
    """33B has 8 kv heads: model parallel 16 cannot split them."""
    with pytest.raises(ParallelCheckError, match=r"attention.core.qk: input 1 dimension 1 \(8 = 8\) is not divisible by its split 16"):
        check_parallel(_model("deepseek-coder-33b", model_parallel=16), 16)
    check_parallel(_model("deepseek-coder-33b", model_parallel=8), 8)


def test_pipeline_needs_layers_and_micro_batches():
    with pytest.raises(ParallelCheckError, match=r"micro_batch_num \(1\) must be >= pipeline_stage \(4\)"):
        check_parallel(_model(pipeline_stage=4), 4)
    # 30 layers over 4 stages: MindFormers' even split (7 per stage) leaves the remainder to the last
    check_parallel(_model(pipeline_stage=4, micro_batch_num=4), 4)


@pytest.mark.parametrize("family", ["deepseek-coder", "wizardcoder", "deepseek2"])
def test_two_pipeline_stages_place_embeddings_layers_norm_and_head(family):
    """pipeline_stage 2: the embeddings on stage 0, the first half of the layers on stage 0 and the rest on
    stage 1, the final norm and the LM head on stage 1; WizardCoder's LM head is its token table, so that
    parameter is read on both stages."""
    from research.deepseek2 import DeepseekV2Config, DeepseekV2ForCausalLM
    from research.wizardcoder import WizardCoderConfig, WizardCoderForCausalLM

    parallel = {"data_parallel": 1, "model_parallel": 1, "pipeline_stage": 2, "micro_batch_num": 2}
    if family == "deepseek-coder":
        model = _model(pipeline_stage=2, micro_batch_num=2)
    elif family == "wizardcoder":
        model = build_skeleton(WizardCoderForCausalLM, WizardCoderConfig(parallel_config=parallel, batch_size=1))
    else:
        model = build_skeleton(DeepseekV2ForCausalLM, DeepseekV2Config(parallel_config=parallel, batch_size=1))
    layers = model.model.layers
    assert len(layers) % 2 == 0
    assert [layer.pipeline_stage for layer in layers] == [0] * (len(layers) // 2) + [1] * (len(layers) // 2)
    assert model.model.tok_embeddings.pipeline_stage == 0
    assert getattr(model.model, "position_embeddings", model.model.tok_embeddings).pipeline_stage == 0
    assert model.model.norm_out.pipeline_stage == 1 and model.lm_head.pipeline_stage == 1
    if family == "wizardcoder":
        assert model.lm_head.weight is model.model.tok_embeddings.embedding_weight
        assert 1 in model.lm_head.weight._pipeline_stage_list  # pylint: disable=protected-access
