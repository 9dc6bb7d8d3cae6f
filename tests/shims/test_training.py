"""The sagemaker_training / sagemaker_containers stand-ins: values, precedence, missing names,
start-up."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tests.shims.helpers import DUMP, make_tree, resource, user_python

# SM_* of the measured reference run (sagemaker-training 5.1.4), with /opt/ml replaced by the tree's
# root.
REFERENCE_VARS = {
    "SM_CHANNELS": '["eval","train"]',
    "SM_CURRENT_HOST": "localhost",
    "SM_CURRENT_INSTANCE_GROUP": "homogeneousCluster",
    "SM_CURRENT_INSTANCE_GROUP_HOSTS": '["localhost"]',
    "SM_CURRENT_INSTANCE_TYPE": "ml.m5.large",
    "SM_DISTRIBUTION_INSTANCE_GROUPS": "[]",
    "SM_FRAMEWORK_MODULE": "",
    "SM_FRAMEWORK_PARAMS": "{}",
    "SM_HOSTS": '["localhost"]',
    "SM_HPS": '{"batch-size":32,"epochs":2,"flag":true,"lr":0.1,"name":"dcgan"}',
    "SM_HP_BATCH-SIZE": "32",
    "SM_HP_EPOCHS": "2",
    "SM_HP_FLAG": "true",
    "SM_HP_LR": "0.1",
    "SM_HP_NAME": "dcgan",
    "SM_INSTANCE_GROUPS": '["homogeneousCluster"]',
    "SM_INSTANCE_GROUPS_DICT": '{"homogeneousCluster":{"hosts":["localhost"],"instance_group_name":'
    '"homogeneousCluster","instance_type":"ml.m5.large"}}',
    "SM_IS_HETERO": "false",
    "SM_LOG_LEVEL": "20",
    "SM_MODULE_NAME": "train",
    "SM_NETWORK_INTERFACE_NAME": "eth0",
    "SM_NUM_GPUS": "0",
    "SM_NUM_NEURONS": "0",
    "SM_USER_ARGS": '["--batch-size","32","--epochs","2","--flag","True","--lr","0.1",'
    '"--name","dcgan"]',
    "SM_USER_ENTRY_POINT": "train.py",
}
REFERENCE_KEYS = {
    "additional_framework_parameters",
    "channel_input_dirs",
    "current_host",
    "current_instance_group",
    "current_instance_group_hosts",
    "current_instance_type",
    "distribution_hosts",
    "distribution_instance_groups",
    "framework_module",
    "hosts",
    "hyperparameters",
    "input_config_dir",
    "input_data_config",
    "input_dir",
    "instance_groups",
    "instance_groups_dict",
    "is_hetero",
    "is_master",
    "is_modelparallel_enabled",
    "is_smddpmprun_installed",
    "is_smddprun_installed",
    "job_name",
    "log_level",
    "master_hostname",
    "model_dir",
    "module_dir",
    "module_name",
    "network_interface_name",
    "num_cpus",
    "num_gpus",
    "num_neurons",
    "output_data_dir",
    "output_dir",
    "output_intermediate_dir",
    "resource_config",
    "topology",
    "user_entry_point",
}


def _dump(root: Path, **kwargs) -> dict:
    done = user_python(DUMP, root, **kwargs)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_reference_tree_gives_the_measured_values(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "ml")
    out = _dump(root)
    env_vars = out["to_env_vars()"]
    for name, value in REFERENCE_VARS.items():
        assert env_vars[name] == value, name
    for name, sub in (
        ("SM_MODEL_DIR", "model"),
        ("SM_OUTPUT_DATA_DIR", "output/data"),
        ("SM_INPUT_DIR", "input"),
        ("SM_CHANNEL_TRAIN", "input/data/train"),
        ("SM_OUTPUT_INTERMEDIATE_DIR", "output/intermediate"),
        ("SM_MODULE_DIR", "code"),
        ("SM_INPUT_CONFIG_DIR", "input/config"),
        ("SM_OUTPUT_DIR", "output"),
    ):
        assert env_vars[name] == f"{root}/{sub}"
    assert env_vars["SM_NUM_CPUS"] == str(os.cpu_count())
    assert set(out["dict(env)"]) == REFERENCE_KEYS
    training_env = json.loads(env_vars["SM_TRAINING_ENV"])
    assert training_env == out["dict(env)"]
    assert training_env["job_name"] is None and training_env["is_master"] is True
    assert training_env["input_data_config"]["train"]["ContentType"] == "text/csv"
    assert out["to_cmd_args()"] == json.loads(REFERENCE_VARS["SM_USER_ARGS"])


def test_two_hosts_and_distribution(tmp_path: Path) -> None:
    hps = {"sagemaker_program": '"train.py"', "sagemaker_pytorch_ddp_enabled": "true", "lr": "0.5"}
    root = make_tree(
        tmp_path / "ml", hps=hps, resource_config=resource("algo-2", ["algo-1", "algo-2"])
    )
    out = _dump(root, env={"TRAINING_JOB_NAME": "job-7", "SAGEMAKER_TRAINING_MODULE": "x.y:main"})
    assert out["hosts"] == ["algo-1", "algo-2"] and out["current_host"] == "algo-2"
    assert out["master_hostname"] == "algo-1" and out["is_master"] is False
    assert out["distribution_instance_groups"] == ["homogeneousCluster"]
    assert out["distribution_hosts"] == ["algo-1", "algo-2"]
    assert out["additional_framework_parameters"] == {"sagemaker_pytorch_ddp_enabled": True}
    assert out["hyperparameters"] == {"lr": 0.5}
    assert out["job_name"] == "job-7" and out["framework_module"] == "x.y:main"


def test_no_instance_groups_is_local_mode(tmp_path: Path) -> None:
    rc = {"current_host": "b", "hosts": ["a", "b"]}
    out = _dump(make_tree(tmp_path / "ml", resource_config=rc))
    assert out["distribution_hosts"] == ["a", "b"] and out["master_hostname"] == "a"
    assert out["instance_groups"] == [] and out["current_instance_type"] == "local"


def test_legacy_sagemaker_containers_api(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "ml")
    code = (
        "import json, sagemaker_containers\n"
        "from sagemaker_containers.beta import framework\n"
        "from sagemaker_containers.beta.framework import env as fenv\n"
        "a = sagemaker_containers.training_env(); b = framework.training_env()\n"
        "c = fenv.TrainingEnv()\n"
        "assert dict(a) == dict(b) == dict(c)\n"
        "print(json.dumps([a.model_dir, a.hosts, a.channel_input_dirs, a.hyperparameters,\n"
        "                  fenv.model_dir, fenv.read_hyperparameters()['epochs'],\n"
        "                  framework.encoders.decode('[1, 2]', framework.content_types.JSON)\n"
        "                  .tolist()]))\n"
    )
    done = user_python(code, root)
    assert done.returncode == 0, done.stderr
    model_dir, hosts, channels, hps, module_model_dir, epochs, decoded = json.loads(done.stdout)
    assert model_dir == module_model_dir == f"{root}/model" and hosts == ["localhost"]
    assert channels == {"eval": f"{root}/input/data/eval", "train": f"{root}/input/data/train"}
    assert hps["batch-size"] == 32 and epochs == 2 and decoded == [1, 2]


def test_missing_names_say_what_to_use(tmp_path: Path) -> None:
    code = """
import sagemaker_training.environment as e, sagemaker_containers, sagemaker_inference
for get in (
    lambda: e.not_a_name,
    lambda: sagemaker_containers.entry_point,
    lambda: sagemaker_inference.model_server,
):
    try:
        get()
    except AttributeError as err:
        print(err)
try:
    import sagemaker_training.mpi
except ModuleNotFoundError as err:
    print(err)
"""
    done = user_python(code, make_tree(tmp_path / "ml"))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "sagemaker_training.environment.not_a_name is not provided by TorchBay" in lines[0]
    assert "pip install sagemaker-training" in lines[0]
    # the real sagemaker-containers needs Python < 3.10: no pip install hint
    assert "use `torchbay train`" in lines[1] and "pip install" not in lines[1]
    assert "torchbay serve" in lines[2]
    assert "sagemaker_training.mpi" in lines[3] and "pip install sagemaker-training" in lines[3]


def test_a_real_package_always_wins(tmp_path: Path) -> None:
    site = tmp_path / "site"
    (site / "sagemaker_training").mkdir(parents=True)
    (site / "sagemaker_training" / "__init__.py").write_text("REAL = True\n")
    code = (
        "import sagemaker_training, sagemaker_inference\n"
        "print(getattr(sagemaker_training, 'REAL', False),\n"
        "      getattr(sagemaker_inference, '__torchbay_shim__', False))"
    )
    done = user_python(code, make_tree(tmp_path / "ml"), pythonpath=[str(site)])
    assert done.returncode == 0, done.stderr
    # the real training package, the stand-in for inference
    assert done.stdout.split() == ["True", "True"]


def test_imports_pull_no_torch_and_no_numpy(tmp_path: Path) -> None:
    code = (
        "import sys\nimport sagemaker_training.environment, sagemaker_containers.beta.framework\n"
        "import sagemaker_inference.content_types, sagemaker_inference.errors\n"
        "import sagemaker_inference.default_inference_handler\n"
        "sagemaker_containers.training_env()\n"
        "print(sorted(m for m in ('torch', 'numpy', 'agent', 'boto3') if m in sys.modules))"
    )
    done = user_python(code, make_tree(tmp_path / "ml"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_shadowed_sitecustomize_still_runs_and_a_user_agent_module_is_harmless(
    tmp_path: Path,
) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "sitecustomize.py").write_text(
        "import os\nos.environ['OTHER_SITECUSTOMIZE'] = 'ran'\n"
    )
    code_dir = tmp_path / "code"
    code_dir.mkdir()
    (code_dir / "agent.py").write_text(
        "raise SystemExit('the user module agent.py was imported at start-up')\n"
    )
    from agent.shims import BOOT_DIR

    root = make_tree(tmp_path / "ml")
    done = user_python(
        "import os, sagemaker_training.environment as e; "
        "print(os.environ.get('OTHER_SITECUSTOMIZE'), "
        "e.Environment().current_host)",
        root,
        env={"PYTHONPATH": os.pathsep.join([str(code_dir), str(BOOT_DIR), str(other)])},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["ran", "localhost"]


def test_star_imports_give_every_name_in_all(tmp_path: Path) -> None:
    """``from ... import *`` of the legacy modules gives what their ``__all__`` lists: the
    environment API with ``TrainingEnv``, and the codecs with the ``UnsupportedFormatError`` that
    sagemaker_inference's decoder raises."""
    code = (
        "import json\n"
        "ns_env, ns_enc = {}, {}\n"
        "exec('from sagemaker_containers.beta.framework.env import *', ns_env)\n"
        "exec('from sagemaker_containers.beta.framework.encoders import *', ns_enc)\n"
        "from sagemaker_containers.beta.framework import env, encoders\n"
        "import sagemaker_inference.errors\n"
        "err = ns_enc['UnsupportedFormatError']\n"
        "try:\n"
        "    ns_enc['decode']('x', 'text/plain')\n"
        "except err as raised:\n"
        "    status = raised.status_code\n"
        "print(json.dumps({'missing_env': sorted(set(env.__all__) - set(ns_env)),\n"
        "                  'missing_enc': sorted(set(encoders.__all__) - set(ns_enc)),\n"
        "                  'env_all': sorted(env.__all__),\n"
        "                  'same_class': err is sagemaker_inference.errors.UnsupportedFormatError"
        ",\n"
        "                  'status': status, 'model_dir': ns_env['model_dir'],\n"
        "                  'hosts': ns_env['TrainingEnv']().hosts}))\n"
    )
    root = make_tree(tmp_path / "ml")
    done = user_python(code, root)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["missing_env"] == [] and out["missing_enc"] == []
    assert {"TrainingEnv", "Environment", "model_dir", "read_hyperparameters"} <= set(
        out["env_all"]
    )
    assert out["same_class"] is True and out["status"] == 415
    assert out["model_dir"] == f"{root}/model" and out["hosts"] == ["localhost"]
