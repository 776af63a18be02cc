"""Every config field is honoured or refused: a walk over the whole Config tree.

Each leaf field must have an entry in EVIDENCE, and each entry is checked here:
- `test:FILE::NAME[:TOKEN]`: a behaviour test that varies the field exists and its source
  names it (TOKEN, default the field's own name; for tests that pass it under another name);
- `refused:K=V[,K=V...]`: loading the defaults with these overrides raises a ConfigError that
  names the field (a combination the components cannot honour).

"The component reads the field somewhere" is not evidence: it shows the value is used, not
what it changes. The fields once covered only that way have their checks in
tests/test_field_effects.py.

A new field without an entry, or an entry for a field that no longer exists, fails the walk.
"""

from __future__ import annotations

import ast
import typing
from pathlib import Path

import msgspec
import pytest

from trustee.config import Config, ConfigError, load_config, struct_type

ROOT = Path(__file__).resolve().parents[1]


def _leaves(cls=Config, prefix="") -> list[str]:
    out = []
    for f in msgspec.structs.fields(cls):
        sub, args = struct_type(f.type), typing.get_args(f.type)
        if sub is not None:
            out += _leaves(sub, f"{prefix}{f.encode_name}.")
        elif typing.get_origin(f.type) is list and args and struct_type(args[0]) is not None:
            out += _leaves(struct_type(args[0]), f"{prefix}{f.encode_name}[].")
        else:
            out.append(prefix + f.encode_name)
    return out


def _vllm_only(role: str, name: str, value: str) -> list[str]:
    """Honoured by vLLM (the value reaches its engine args), refused on the HF backend."""
    return [
        "test:tests/test_field_effects.py::test_vllm_engine_fields_reach_the_engine_args",
        f"refused:engines.{role}.{name}={value}",
    ]


def _openai_only(role: str, name: str, value: str) -> list[str]:
    return [f"refused:engines.{role}.{name}={value}"]


EVIDENCE: dict[str, list[str]] = {
    "name": ["test:tests/test_resume.py::test_finished_run_says_so_and_changed_config_is_refused:cpu-tiny"],
    "seed": ["test:tests/test_field_effects.py::test_seed_fixes_the_policy_engines_sampling"],
    "model.path": ["test:tests/test_config.py::test_cli_run_writes_resolved_config"],
    "model.tiny": ["test:tests/test_field_effects.py::test_tiny_builds_the_missing_model"],
    "model.packaged": [
        "test:tests/test_models_packaged.py::test_packaged_writes_the_missing_model_at_the_start_of_a_run",
        "refused:model.packaged=smollm2-135m-instruct,model.tiny=test",
    ],
    "model.tiny_sft_steps": [
        "test:tests/test_toy_sft.py::test_short_warm_up_writes_weights_and_report:sft_warm",
    ],
    "model.chat_template": ["test:tests/test_episode.py::test_runner_from_config_uses_the_model_section"],
    "model.enable_thinking": [
        "test:tests/test_chat_render.py::test_generation_prompt_with_thinking_off_contains_empty_think"
    ],
    "model.dtype": ["test:tests/test_field_effects.py::test_model_dtype_is_the_learners_and_engines_dtype"],
    "model.max_model_len": ["test:tests/test_episode.py::test_max_model_len_is_never_exceeded"],
    "model.adapter": [
        "test:tests/test_first_hour.py::test_a_new_run_continues_a_trained_adapter",
        "refused:model.adapter=x,learner.mode=full",
    ],
    "engines.policy.backend": [
        "test:tests/test_field_effects.py::test_vllm_engine_fields_reach_the_engine_args",
        "refused:engines.policy.backend=openai,engines.policy.base_url=http://x",
    ],
    "engines.policy.max_num_seqs": [
        "test:tests/test_field_effects.py::test_vllm_engine_fields_reach_the_engine_args",
        "test:tests/test_engine_hf.py::test_registry_and_build_engine",
        "refused:engines.policy.backend=vllm,engines.simulator.backend=openai,engines.simulator.base_url=http://x,engines.simulator.max_num_seqs=4",
    ],
    "engines.policy.gpu_memory_utilization": _vllm_only("policy", "gpu_memory_utilization", "0.5"),
    "engines.policy.kv_cache_gib": _vllm_only("policy", "kv_cache_gib", "2.0")
    + [
        "test:tests/test_engine_vllm.py::test_engine_env_strips_expandable_segments_and_the_legacy_kv_variable"
    ],
    "engines.policy.enable_prefix_caching": [
        "test:tests/test_field_effects.py::test_vllm_engine_fields_reach_the_engine_args",
        "test:tests/test_engine_hf_prefix.py::test_enable_prefix_caching_false_turns_reuse_off",
    ],
    "engines.policy.enable_sleep_mode": _vllm_only("policy", "enable_sleep_mode", "false"),
    "engines.policy.max_lora_rank": _vllm_only("policy", "max_lora_rank", "8")
    + ["refused:engines.policy.backend=vllm,engines.policy.max_lora_rank=8,learner.lora_rank=16"],
    "engines.policy.tensor_parallel_size": _vllm_only("policy", "tensor_parallel_size", "2"),
    "engines.policy.data_parallel_size": _vllm_only("policy", "data_parallel_size", "2"),
    "engines.policy.enforce_eager": _vllm_only("policy", "enforce_eager", "true"),
    "engines.policy.base_url": ["refused:engines.policy.base_url=http://x"],
    "engines.policy.timeout_s": _openai_only("policy", "timeout_s", "5.0")
    + ["test:tests/test_engine_openai.py::test_timeout_is_retried_then_recoverable"],
    "engines.policy.max_retries": _openai_only("policy", "max_retries", "1")
    + ["test:tests/test_engine_openai.py::test_5xx_is_retried_then_succeeds"],
    "engines.simulator.backend": [
        "test:tests/test_field_effects.py::test_vllm_engine_fields_reach_the_engine_args",
        "test:tests/test_config.py::test_cross_field_checks_are_collected:engines.simulator.backend",
    ],
    "engines.simulator.max_num_seqs": [
        "test:tests/test_field_effects.py::test_vllm_engine_fields_reach_the_engine_args",
        "test:tests/test_engine_hf.py::test_registry_and_build_engine",
        "refused:engines.simulator.backend=openai,engines.simulator.base_url=http://x,engines.simulator.max_num_seqs=4",
    ],
    "engines.simulator.gpu_memory_utilization": _vllm_only("simulator", "gpu_memory_utilization", "0.5"),
    "engines.simulator.kv_cache_gib": _vllm_only("simulator", "kv_cache_gib", "2.0"),
    "engines.simulator.enable_prefix_caching": [
        "test:tests/test_field_effects.py::test_vllm_engine_fields_reach_the_engine_args",
        "test:tests/test_engine_hf_prefix.py::test_enable_prefix_caching_false_turns_reuse_off",
    ],
    "engines.simulator.enable_sleep_mode": [
        "test:tests/test_field_effects.py::test_vllm_engine_fields_reach_the_engine_args",
        "test:tests/test_field_effects.py::test_simulator_sleep_mode_lets_the_engine_sleep_or_refuses",
        "refused:placement.mode=colocate",
    ],
    # The simulator never loads an adapter: any rank but 0 is refused.
    "engines.simulator.max_lora_rank": ["refused:engines.simulator.max_lora_rank=16"],
    "engines.simulator.tensor_parallel_size": _vllm_only("simulator", "tensor_parallel_size", "2"),
    "engines.simulator.data_parallel_size": _vllm_only("simulator", "data_parallel_size", "2"),
    "engines.simulator.enforce_eager": _vllm_only("simulator", "enforce_eager", "true"),
    "engines.simulator.base_url": ["refused:engines.simulator.base_url=http://x"],
    "engines.simulator.timeout_s": _openai_only("simulator", "timeout_s", "5.0"),
    "engines.simulator.max_retries": _openai_only("simulator", "max_retries", "1"),
    "simulator.engine": [
        "test:tests/test_sim_policy_base.py::test_simulator_on_the_policy_base_never_sees_the_adapter:policy-base",
        "refused:simulator.engine=policy-base,learner.mode=full",
    ],
    "simulator.model_path": [
        "test:tests/test_field_effects.py::test_simulator_model_path_picks_the_simulator_model"
    ],
    "simulator.temperature": [
        "test:tests/test_field_effects.py::test_judge_temperature_is_the_judges_sampling_temperature"
    ],
    "simulator.judge_mode": [
        "test:tests/test_field_effects.py::test_judge_mode_and_task_budget_shape_the_simulated_environment",
        "refused:environment.reward=rubric,simulator.judge_mode=trustee",
    ],
    "simulator.judge_temperature": [
        "test:tests/test_field_effects.py::test_judge_temperature_is_the_judges_sampling_temperature"
    ],
    "simulator.judge_votes": ["test:tests/test_sim_roles.py::test_build_from_config_sections"],
    "simulator.judge_vote_rule": ["test:tests/test_sim_roles.py::test_build_from_config_sections"],
    "simulator.max_decode_retries": ["test:tests/test_sim_roles.py::test_ask_retries_then_raises_sim_error"],
    "simulator.max_task_regenerations": [
        "test:tests/test_sim_roles.py::test_task_generator_rejects_and_regenerates:max_regenerations",
    ],
    "simulator.max_user_turns": [
        "test:tests/test_field_effects.py::test_max_user_turns_caps_the_user_simulators_replies"
    ],
    "simulator.max_tokens": ["test:tests/test_sim_roles.py::test_build_from_config_sections"],
    "simulator.task_max_tokens": [
        "test:tests/test_field_effects.py::test_judge_mode_and_task_budget_shape_the_simulated_environment"
    ],
    "simulator.tool_catalog": [
        "test:tests/test_sim_roles.py::test_catalog_prefers_one_category:catalog",
    ],
    "simulator.few_shot": [
        "test:tests/test_sim_policy_base.py::test_worked_scenarios_come_before_the_task_request",
        "refused:simulator.few_shot=2",
    ],
    "simulator.tool_few_shot": [
        "test:tests/test_sim_taskcheck.py::test_worked_tool_calls_hold_real_results_before_every_task_block",
        "refused:simulator.tool_few_shot=2",
    ],
    "simulator.grounded_tasks": [
        "test:tests/test_sim_taskcheck.py::test_grounded_tasks_are_regenerated_and_counted",
    ],
    "simulator.tiny_sft_steps": [
        "refused:simulator.tiny_sft_steps=5",
        "test:tests/test_run_checks.py::test_a_missing_tiny_simulator_is_built_and_warmed_on_the_toy_teacher",
    ],
    "environment.kind": ["test:tests/test_train.py::test_simulated_environment_runs_through_the_loop"],
    "environment.reward": [
        "refused:environment.kind=toy,environment.reward=judge",
        "test:tests/test_sim_roles.py::test_build_from_config_sections",
    ],
    "environment.bfcl.categories": [
        "test:tests/test_field_effects.py::test_bfcl_categories_choose_what_training_draws"
    ],
    "environment.bfcl.split": [
        "test:tests/test_bfcl_env.py::test_split_is_fixed_half_and_disjoint:split",
        "test:tests/test_field_effects.py::test_bfcl_split_fields_choose_the_training_pool",
    ],
    "environment.bfcl.split_seed": [
        "test:tests/test_bfcl_env.py::test_split_is_fixed_half_and_disjoint:seed",
        "test:tests/test_field_effects.py::test_bfcl_split_fields_choose_the_training_pool",
    ],
    "environment.bfcl.train_fraction": [
        "test:tests/test_field_effects.py::test_bfcl_split_fields_choose_the_training_pool"
    ],
    "environment.bfcl.hints": ["test:tests/test_bfcl_env.py::test_hints_switch_changes_only_the_observation"],
    "environment.bfcl.max_steps_per_turn": [
        "test:tests/test_bfcl_env.py::test_step_cap_ends_turn_and_force_quit_ends_episode"
    ],
    "environment.bfcl.force_quit_ends_episode": [
        "test:tests/test_bfcl_env.py::test_step_cap_ends_turn_and_force_quit_ends_episode"
    ],
    "environment.bfcl.miss_turn_warning": ["test:tests/test_bfcl_env.py::test_miss_turn_warning_and_refusal"],
    "environment.bfcl.syntax_instances": ["test:tests/test_bfcl_env.py::test_make_task_follows_stage_knobs"],
    "environment.bfcl.system_prompt": [
        "test:tests/test_field_effects.py::test_bfcl_system_prompt_opens_the_episode"
    ],
    "rollout.temperature": [
        "test:tests/test_field_effects.py::test_rollout_temperature_reaches_the_engine_and_the_learner"
    ],
    "rollout.max_turns": ["test:tests/test_episode.py::test_turn_limit_truncates_and_still_scores:max_turns"],
    "rollout.max_tool_calls_per_turn": [
        "test:tests/test_episode.py::test_calls_over_the_turn_limit_are_not_executed"
    ],
    "rollout.max_tokens_per_turn": [
        "refused:rollout.max_tokens_per_turn=9000",
    ],
    "rollout.max_tool_result_tokens": [
        "test:tests/test_episode.py::test_long_tool_results_are_cut_with_a_marker"
    ],
    "rollout.max_inflight_episodes": [
        "test:tests/test_field_effects.py::test_max_inflight_episodes_bounds_the_episodes_running_at_once"
    ],
    "rollout.max_staleness": ["test:tests/test_train.py::test_overlap_mode_trains_while_episodes_run"],
    "grpo.steps": ["test:tests/test_resume.py::test_finished_run_says_so_and_changed_config_is_refused"],
    "grpo.tasks_per_step": [
        'test:tests/test_train.py::test_loop_trains_syncs_weights_and_resumes:groups_trained"] == 2.0'
    ],
    "grpo.group_size": ["test:tests/test_train.py::test_loop_trains_syncs_weights_and_resumes:== 8"],
    "grpo.loss_type": ["test:tests/test_learn_grpo.py::test_aggregations_match_hand_values"],
    "grpo.dr_grpo_length": ["test:tests/test_field_effects.py::test_dr_grpo_length_is_the_loss_normaliser"],
    "grpo.clip_low": [
        "test:tests/test_learn_grpo.py::test_clipped_surrogate_matches_hand_table",
        "refused:grpo.clip_low=0.3,grpo.clip_high=0.1",
    ],
    "grpo.clip_high": ["test:tests/test_learn_grpo.py::test_clipped_surrogate_matches_hand_table"],
    "grpo.beta": ["test:tests/test_field_effects.py::test_beta_adds_the_kl_term"],
    "grpo.scale_rewards": [
        "test:tests/test_learn_advantages.py::test_batch_scale_uses_std_of_kept_groups:scale",
    ],
    "grpo.filter_zero_variance": [
        "test:tests/test_learn_advantages.py::test_zero_variance_kept_when_filter_off"
    ],
    "grpo.is_level": ["test:tests/test_field_effects.py::test_is_level_changes_the_importance_correction"],
    "grpo.is_mode": ["test:tests/test_learn_grpo.py::test_is_weight_multiplies_surrogate_not_kl"],
    "grpo.is_min": ["test:tests/test_learn_grpo.py::test_is_weight_multiplies_surrogate_not_kl"],
    "grpo.is_max": [
        "test:tests/test_learn_grpo.py::test_is_weight_multiplies_surrogate_not_kl",
        "refused:grpo.is_max=0.5,grpo.is_min=1.0",
    ],
    "learner.mode": [
        "test:tests/test_learn_policy.py::test_full_step_changes_base_parameters:full",
        "refused:learner.mode=qlora",
    ],
    "learner.lr": [
        "test:tests/test_learn_policy.py::test_lora_step_moves_only_adapters_in_the_advantage_direction"
    ],
    "learner.schedule": ["test:tests/test_learn_policy.py::test_lr_schedule_warmup_then_cosine"],
    "learner.min_lr_ratio": ["test:tests/test_learn_policy.py::test_lr_schedule_warmup_then_cosine"],
    "learner.warmup_steps": ["test:tests/test_learn_policy.py::test_lr_schedule_warmup_then_cosine"],
    "learner.weight_decay": ["test:tests/test_field_effects.py::test_weight_decay_shrinks_the_weights"],
    "learner.max_grad_norm": ["test:tests/test_field_effects.py::test_max_grad_norm_clips_the_update"],
    "learner.lora_rank": [
        'test:tests/test_train.py::test_loop_trains_syncs_weights_and_resumes:"r"',
        "test:tests/test_learn_policy.py::test_load_policy_lora_from_directory",
    ],
    "learner.lora_alpha": [
        "test:tests/test_field_effects.py::test_lora_alpha_and_dropout_shape_the_adapters"
    ],
    "learner.lora_dropout": [
        "test:tests/test_field_effects.py::test_lora_alpha_and_dropout_shape_the_adapters"
    ],
    "learner.lora_targets": ["test:tests/test_learn_policy.py::test_load_policy_lora_from_directory"],
    "learner.micro_batch_tokens": [
        "test:tests/test_field_effects.py::test_micro_batch_tokens_splits_the_step"
    ],
    "learner.gradient_checkpointing": [
        "test:tests/test_field_effects.py::test_gradient_checkpointing_is_switched_on_the_model"
    ],
    "learner.logprob_chunk": [
        "test:tests/test_field_effects.py::test_logprob_chunk_bounds_the_rows_of_the_lm_head"
    ],
    "learner.share_prefix": [
        "test:tests/test_learn_shared.py::test_share_prefix_auto_falls_back_when_the_shared_path_is_wrong",
        "test:tests/test_learn_shared.py::test_step_reports_the_shared_share_and_auto_keeps_a_correct_shared_path",
    ],
    "placement.mode": ["test:tests/test_train.py::test_overlap_mode_trains_while_episodes_run"],
    "placement.policy_gpus": ["refused:placement.policy_gpus=[0,1]"],
    "placement.simulator_gpus": ["refused:placement.simulator_gpus=[0,0]"],
    "placement.learner_gpus": [
        "refused:placement.mode=split,placement.policy_gpus=[0],placement.learner_gpus=[0]"
    ],
    "curriculum.kind": [
        "test:tests/test_curriculum.py::test_fixed_kind_never_moves",
        "refused:curriculum.kind=staged,environment.kind=toy,environment.reward=exact,curriculum.stages=[{name='a'}]",
    ],
    "curriculum.start_difficulty": [
        "test:tests/test_curriculum.py::test_d_moves_by_delta_against_thresholds"
    ],
    "curriculum.delta": ["test:tests/test_curriculum.py::test_d_moves_by_delta_against_thresholds"],
    "curriculum.low": [
        "test:tests/test_curriculum.py::test_d_moves_by_delta_against_thresholds:low",
        "refused:curriculum.low=0.6",
    ],
    "curriculum.high": ["test:tests/test_curriculum.py::test_d_moves_by_delta_against_thresholds"],
    "curriculum.eps": ["test:tests/test_curriculum.py::test_eps_zero_gives_values_at_d"],
    **{
        f"curriculum.aspects.{a}": ["test:tests/test_curriculum.py::test_aspect_endpoints_match_trustee"]
        for a in (
            "n_tools",
            "n_expected_calls",
            "n_turns",
            "prompt_specificity",
            "persona_expertise",
            "query_ambiguity",
            "judge_strictness",
        )
    },
    "curriculum.aspects.tool_error_rate": [
        "test:tests/test_sim_roles.py::test_error_injection_is_deterministic_per_call:injected_failure"
    ],
    "curriculum.stages[].name": [
        "test:tests/test_bfcl_stages.py::test_envtuning_config_loads_and_names_four_stages"
    ],
    "curriculum.stages[].reward": ["test:tests/test_bfcl_env.py::test_make_task_follows_stage_knobs"],
    "curriculum.stages[].hints": ["test:tests/test_bfcl_env.py::test_make_task_follows_stage_knobs"],
    "curriculum.stages[].split": ["test:tests/test_bfcl_env.py::test_make_task_follows_stage_knobs"],
    "curriculum.stages[].advance_after_steps": [
        "test:tests/test_curriculum.py::test_staged_schedule_advances_by_steps_and_metric:hints-base"
    ],
    "curriculum.stages[].advance_metric": [
        "test:tests/test_curriculum.py::test_staged_schedule_advances_by_steps_and_metric:accuracy"
    ],
    "curriculum.stages[].advance_threshold": [
        'test:tests/test_curriculum.py::test_staged_schedule_advances_by_steps_and_metric:accuracy": 0.4'
    ],
    "curriculum.stages[].advance_patience": [
        "test:tests/test_curriculum.py::test_staged_schedule_advances_by_steps_and_metric:streak broken"
    ],
    "eval.categories": ["test:tests/test_eval_bfcl.py::test_oracle_engine_scores_100_through_eval_path"],
    "eval.multi_turn_split": ["test:tests/test_field_effects.py::test_eval_multi_turn_split_and_step_cap"],
    "eval.limit": ["test:tests/test_eval_bfcl.py::test_oracle_engine_scores_100_through_eval_path"],
    "eval.concurrency": ["test:tests/test_field_effects.py::test_eval_sampling_and_concurrency_fields"],
    "eval.temperature": ["test:tests/test_field_effects.py::test_eval_sampling_and_concurrency_fields"],
    "eval.max_tokens_per_turn": [
        "test:tests/test_field_effects.py::test_eval_sampling_and_concurrency_fields"
    ],
    "eval.max_steps_per_turn": ["test:tests/test_field_effects.py::test_eval_multi_turn_split_and_step_cap"],
    "eval.out": ["test:tests/test_field_effects.py::test_eval_writes_outside_the_model_directory:eval.out"],
    "logging.progress_bar": [
        "test:tests/test_metrics.py::test_progress_bar_shows_keys_a_training_step_writes"
    ],
    "logging.wandb_project": ["test:tests/test_metrics.py::test_wandb_resumes_the_same_run_id"],
    "logging.trajectories": [
        "test:tests/test_metrics.py::test_trajectories_all_sampled_none_and_the_size_cap"
    ],
    "logging.trajectories_fraction": [
        "test:tests/test_metrics.py::test_trajectories_all_sampled_none_and_the_size_cap"
    ],
    "logging.trajectories_max_mb": [
        "test:tests/test_metrics.py::test_trajectories_all_sampled_none_and_the_size_cap"
    ],
    "logging.log_every": ["test:tests/test_metrics.py::test_log_every_and_elapsed_continue_after_resume"],
    "checkpoint.every_steps": [
        "test:tests/test_faults.py::test_dead_engine_checkpoints_last_good_step_and_the_same_command_resumes"
    ],
    "checkpoint.keep": ["test:tests/test_checkpoint.py::test_round_trip_and_pruning"],
    "checkpoint.resume": [
        "test:tests/test_resume.py::test_finished_run_says_so_and_changed_config_is_refused"
    ],
    "checkpoint.on_interrupt": [
        "test:tests/test_faults.py::test_on_interrupt_abandon_drops_the_step_finish_completes_it"
    ],
    "learner.offload": [
        "test:tests/test_memory_model.py::test_offload_round_trip_is_bit_exact_and_empties_the_storages",
        "test:tests/test_placement.py::test_colocate_offload_moves_the_learner_state_out_before_the_wake_and_back_after_sleep",
    ],
    "learner.weight_transport": [
        "test:tests/test_weight_transport.py::test_auto_picks_the_shared_route_only_where_every_policy_worker_has_a_rank_beside_it",
        "refused:learner.weight_transport=shared",
    ],
    "checkpoint.before_wake": [
        "test:tests/test_faults.py::test_a_failed_wake_costs_no_trained_step_and_resume_continues_after_it"
    ],
    # training controls (issue 9)
    "grpo.updates_per_batch": [
        "test:tests/test_training_controls.py::test_several_updates_per_batch_make_the_clip_bind"
    ],
    "grpo.mini_batches": [
        "test:tests/test_training_controls.py::test_several_updates_per_batch_make_the_clip_bind"
    ],
    "grpo.dynamic_sampling": [
        "test:tests/test_training_controls.py::test_dynamic_sampling_replaces_zero_variance_groups"
    ],
    "grpo.max_resample_rounds": [
        "test:tests/test_training_controls.py::test_dynamic_sampling_replaces_zero_variance_groups"
    ],
    "grpo.overlong": ["test:tests/test_training_controls.py::test_overlong_modes"],
    "grpo.overlong_buffer": ["test:tests/test_training_controls.py::test_overlong_penalty_ramp:buffer"],
    "grpo.overlong_penalty": ["test:tests/test_training_controls.py::test_overlong_penalty_ramp:penalty"],
    "grpo.turn_credit": [
        "test:tests/test_turn_credit.py::test_the_update_lowers_a_malformed_turn_that_episode_credit_would_raise"
    ],
    "grpo.malformed_advantage": ["test:tests/test_turn_credit.py::test_turn_credit_reads_the_grpo_section"],
    "grpo.kl_metric": [
        "test:tests/test_training_controls.py::test_kl_metric_measures_the_drift_from_the_start",
        "refused:learner.mode=full,grpo.kl_metric=true,grpo.beta=0",
    ],
    "eval.every_steps": [
        "test:tests/test_training_controls.py::test_eval_during_training_logs_heldout_metrics"
    ],
    "eval.heldout_tasks": ["test:tests/test_training_controls.py::test_heldout_eval_greedy_and_sampled"],
    "eval.heldout_samples": ["test:tests/test_training_controls.py::test_heldout_eval_greedy_and_sampled"],
    "eval.heldout_difficulty": ["test:tests/test_training_controls.py::test_heldout_eval_greedy_and_sampled"],
    "eval.judge_agreement": [
        "test:tests/test_eval_judge_agreement.py::test_cli_judge_agreement_with_the_tiny_model:judge_agreement"
    ],
    "placement.gpu_memory_gib": [
        "test:tests/test_placement.py::test_dry_run_refuses_a_full_8b_learner_on_one_shared_gpu"
    ],
    "placement.learner_ranks": [
        "test:tests/test_learn_distributed.py::test_learner_ranks_config_checks",
        "test:tests/test_learn_distributed.py::test_training_loop_with_two_ranks_trains_checkpoints_resumes_and_ends_its_ranks",
    ],
    # bring your own environment, model families (issue 15)
    "environment.factory": ["test:tests/test_envs_custom.py::test_python_factory_must_return_an_environment"],
    "environment.options": [
        "refused:environment.kind=toy,environment.reward=exact,environment.options={x=1}"
    ],
    "environment.few_shot": [
        "test:tests/test_toy_env.py::test_few_shot_examples_are_distinct_kinds_of_training_tasks_and_stable",
        "test:tests/test_sim_policy_base.py::test_the_simulated_policy_sees_the_toy_examples_and_never_trains_on_them",
        "refused:environment.few_shot=2",
    ],
    "environment.uses_simulator": [
        "test:tests/test_field_effects.py::test_uses_simulator_starts_the_simulator_engine_for_the_factory"
    ],
    "environment.tasks_file.path": [
        "test:tests/test_envs_custom.py::test_tasks_file_kind_builds_from_the_config_alone"
    ],
    "environment.tasks_file.tools": [
        "test:tests/test_envs_custom.py::test_config_rules_name_field_value_and_fix"
    ],
    "environment.tasks_file.tools_module": [
        "test:tests/test_envs_custom.py::test_config_rules_name_field_value_and_fix"
    ],
    "environment.tasks_file.reward_fn": [
        "test:tests/test_envs_custom.py::test_config_rules_name_field_value_and_fix"
    ],
    "environment.tasks_file.judge_weight": [
        "test:tests/test_envs_custom.py::test_simulated_tools_and_function_plus_judge_on_a_tiny_model"
    ],
    "environment.mcp.tasks": [
        "test:tests/test_mcp.py::test_dry_run_checks_name_a_missing_command_and_a_bad_tasks_file"
    ],
    "environment.mcp.servers[].name": [
        "test:tests/test_mcp.py::test_config_rules_name_the_field_value_and_fix"
    ],
    "environment.mcp.servers[].command": [
        "test:tests/test_mcp_servers.py::test_config_fields_reach_and_change_the_environment"
    ],
    "environment.mcp.servers[].args": [
        "test:tests/test_mcp_servers.py::test_config_fields_reach_and_change_the_environment"
    ],
    "environment.mcp.servers[].env": [
        "test:tests/test_mcp_servers.py::test_config_fields_reach_and_change_the_environment:FAKE_TAG"
    ],
    "environment.mcp.servers[].url": ["test:tests/test_mcp_servers.py::test_streamable_http_server_by_url"],
    "environment.mcp.servers[].scope": [
        "test:tests/test_mcp_servers.py::test_config_fields_reach_and_change_the_environment"
    ],
    "environment.mcp.workdir_template": [
        "test:tests/test_mcp_servers.py::test_config_fields_reach_and_change_the_environment"
    ],
    "environment.mcp.keep_failed_workdirs": [
        "test:tests/test_mcp_servers.py::test_config_fields_reach_and_change_the_environment"
    ],
    "environment.mcp.init_timeout": [
        "test:tests/test_mcp_servers.py::test_server_that_never_answers_initialize_fails_the_episode_in_time:init=3.0"
    ],
    "environment.mcp.call_timeout": [
        "test:tests/test_mcp_servers.py::test_config_fields_reach_and_change_the_environment"
    ],
    "environment.mcp.shutdown_grace": [
        "test:tests/test_mcp_servers.py::test_config_fields_reach_and_change_the_environment"
    ],
    "environment.mcp.pool_size": [
        "test:tests/test_mcp_servers.py::test_config_fields_reach_and_change_the_environment"
    ],
    "environment.mcp.max_episodes_per_server": [
        "test:tests/test_mcp_servers.py::test_config_fields_reach_and_change_the_environment"
    ],
    "environment.mcp.generate_attempts": [
        "test:tests/test_mcp_servers.py::test_generated_tasks_are_kept_only_when_their_calls_succeed_on_a_fresh_server"
    ],
    "environment.mcp.reward_fn": [
        "test:tests/test_mcp_servers.py::test_config_fields_reach_and_change_the_environment"
    ],
    "environment.mcp.judge_weight": [
        "refused:environment.kind=mcp,environment.reward=reference,environment.mcp.judge_weight=0.3"
    ],
    "model.chat_format": [
        "test:tests/test_chat_render.py::test_family_is_detected_from_the_tokenizer_and_the_spec_picks_its_template"
    ],
}


@pytest.fixture(scope="module")
def test_sources() -> dict[str, str]:
    out = {}
    for p in sorted((ROOT / "tests").glob("test_*.py")):
        src = p.read_text()
        for n in ast.parse(src).body:
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name.startswith("test_"):
                out[f"tests/{p.name}::{n.name}"] = ast.get_source_segment(src, n)
    return out


def test_every_field_has_evidence_and_nothing_else():
    leaves = set(_leaves())
    assert len(leaves) > 100
    assert sorted(leaves - set(EVIDENCE)) == [], (
        "fields without evidence: honour them (and add a test) or refuse them"
    )
    assert sorted(set(EVIDENCE) - leaves) == [], "evidence for fields that no longer exist"
    kinds = {e.partition(":")[0] for ev in EVIDENCE.values() for e in ev}
    assert kinds <= {"test", "refused"}, kinds
    assert all(EVIDENCE.values()), [f for f, ev in EVIDENCE.items() if not ev]


@pytest.mark.parametrize("field", sorted(EVIDENCE))
def test_field_is_honoured_or_refused(field, test_sources):
    leaf = field.split(".")[-1]
    for ev in EVIDENCE[field]:
        kind, _, rest = ev.partition(":")
        if kind == "test":
            path, _, tail = rest.partition("::")
            name, _, token = tail.partition(":")
            ref = f"{path}::{name}"
            assert ref in test_sources, f"{field}: test {ref} not found"
            assert (token or leaf) in test_sources[ref], f"{field}: {ref} does not mention {token or leaf!r}"
        elif kind == "refused":
            with pytest.raises(ConfigError) as e:
                load_config(None, _split_keep_tables(rest))
            assert leaf in str(e.value) or field.split("[]")[0] in str(e.value), (
                f"{field}: refusal does not name it: {e.value}"
            )
        else:
            pytest.fail(f"{field}: unknown evidence kind {kind!r}")


def _split_keep_tables(s: str) -> list[str]:
    """Split overrides on commas outside [...] / {...}."""
    out, depth, cur = [], 0, ""
    for ch in s:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return out + [cur]
