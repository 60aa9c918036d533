from __future__ import annotations

import textwrap

import pytest

from agent.config import ImagePullPolicy, UpdateMode, load_config, parse_config
from agent.errors import ConfigError
from agent.units import Duration, parse_data_size


def load(tmp_path, text, env=None):
    path = tmp_path / "agent.yaml"
    path.write_text(textwrap.dedent(text))
    return load_config(path, env=env or {})


def problems(tmp_path, text, env=None):
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text, env)
    return info.value.problems


DROVE_MINIMAL = """
server: {applicationConnectors: [{type: http, port: 3000}], adminConnectors: [{type: http, port: 3001}]}
options: {hostname: exec-1.local, cacheImages: true, remoteUpdateMode: RPC}
controllers: {endpoints: ["http://ctl-1:10000", "http://ctl-2:10000"]}
resources: {osCores: [0, 1], exposedMemPercentage: 60}
clusterAuth: {secrets: [{nodeType: CONTROLLER, secret: LocalControllerSecret},
                        {nodeType: EXECUTOR, secret: LocalExecutorSecret}]}
"""


def test_drove_minimal_example_loads_unchanged(tmp_path):
    cfg = load(tmp_path, DROVE_MINIMAL)
    assert cfg.server.port == 3000
    assert cfg.options.hostname == "exec-1.local"
    assert cfg.mode is UpdateMode.RPC
    assert cfg.controllers is not None
    assert cfg.controllers.endpoints == ("http://ctl-1:10000", "http://ctl-2:10000")
    assert cfg.controllers.leadership_check_interval_s == 10
    assert cfg.resources.os_cores == {0, 1}
    assert cfg.resources.exposed_mem_percentage == 60
    assert cfg.cluster_auth.controller_secret == "LocalControllerSecret"
    assert cfg.cluster_auth.executor_secret == "LocalExecutorSecret"


def test_empty_file_is_standalone_with_defaults(tmp_path):
    cfg = load(tmp_path, "")
    assert cfg.mode is UpdateMode.STANDALONE
    assert cfg.server.port == 3000
    assert cfg.options.cache_images is True
    assert cfg.options.image_pull_policy is ImagePullPolicy.IF_NOT_PRESENT
    assert cfg.options.max_open_files == 470000
    assert cfg.cluster_auth.accepted() == ("DefaultControllerSecret", "DefaultExecutorSecret")


def test_shipped_configs_load(request):
    root = request.config.rootpath
    for name in ("agent.yaml", "agent.example.yaml"):
        cfg = load_config(root / "config" / name, env={})
        assert cfg.mode is UpdateMode.STANDALONE


def test_exposed_mem_percentage_above_maximum(tmp_path):
    assert problems(tmp_path, "resources: {exposedMemPercentage: 120}") == [
        "resources.exposedMemPercentage: 120 is above the maximum 100"
    ]


def test_every_problem_is_reported_with_its_key(tmp_path):
    found = problems(
        tmp_path,
        """
        server: {port: 70000}
        options: {cacheImages: maybe, containerCommandTimeout: 2 seconds, logBufferSize: 500MB}
        resources: {exposedMemPercentage: 10, osCores: [1, x], overProvisioning: {cpuMultiplier: 70}}
        """,
    )
    assert found == [
        "server.port: 70000 is above the maximum 65535",
        "options.cacheImages: 'maybe' is not true or false",
        "options.logBufferSize: 500MB is above the maximum 128 MB",
        "options.containerCommandTimeout: 2 seconds is below the minimum 5 seconds",
        "resources.overProvisioning.cpuMultiplier: 70 is above the maximum 64",
        "resources.osCores[1]: 'x' is not a core number",
        "resources.exposedMemPercentage: 10 is below the minimum 50",
    ]


def test_unknown_keys_are_errors(tmp_path):
    found = problems(tmp_path, "options: {cachImages: true}\nresource: {}\n")
    assert found == ["options.cachImages: unknown key", "resource: unknown key"]


def test_logging_section_is_ignored_with_a_warning(tmp_path):
    cfg = load(tmp_path, "logging: {level: INFO, appenders: [{type: console}]}")
    assert cfg.warnings == (
        "logging: ignored (Dropwizard logging is not used; the agent logs to stdout)",
    )


def test_env_substitution(tmp_path):
    cfg = load(
        tmp_path,
        "server: {port: ${PORT}}\noptions: {hostname: '${HOST_NAME:-fallback}', stateDir: '$${LIT}'}",
        env={"PORT": "4000"},
    )
    assert cfg.server.port == 4000
    assert cfg.options.hostname == "fallback"
    assert cfg.options.state_dir == "${LIT}"


def test_unset_env_variable_is_an_error(tmp_path):
    found = problems(tmp_path, "options:\n  hostname: ${NOPE}\n")
    assert found == ["line 2: environment variable NOPE is not set (${NOPE})"]


def test_durations_and_sizes(tmp_path):
    cfg = load(
        tmp_path,
        """
        options:
          containerCommandTimeout: 1 minute
          taskStopGracePeriod: 100ms
          cacheFileSize: 20 megabytes
          logBufferSize: 5m
        controllers: {endpoints: ["http://127.0.0.1:4000/"], leadershipCheckInterval: 15s}
        """,
    )
    assert cfg.options.container_command_timeout_s == 60
    assert cfg.options.task_stop_grace_period_s == pytest.approx(0.1)
    assert cfg.options.cache_file_size_mb == 19  # 20 * 10^6 bytes
    assert cfg.options.log_buffer_size_mb == 4
    assert cfg.controllers is not None
    assert cfg.controllers.endpoints == ("http://127.0.0.1:4000",)
    assert cfg.controllers.leadership_check_interval_s == 15


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("15 minutes", "15 minutes"),
        ("1 second", "1 second"),
        ("100s", "100 seconds"),
        ("2h", "2 hours"),
    ],
)
def test_duration_parse_and_format(text, shown):
    assert str(Duration.parse(text)) == shown


def test_duration_errors():
    with pytest.raises(ValueError, match="unknown time unit 'fortnights'"):
        Duration.parse("2 fortnights")
    with pytest.raises(ValueError, match="not a duration"):
        Duration.parse("soon")


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("10MB", 10_000_000),
        ("5m", 5_000_000),
        ("20 megabytes", 20_000_000),
        ("1KiB", 1024),
        ("2 GiB", 2 << 30),
        ("7", 7),
    ],
)
def test_data_sizes(text, size):
    assert parse_data_size(text) == size


def test_controller_endpoint_needs_a_port(tmp_path):
    found = problems(tmp_path, "controllers: {endpoints: ['http://ctl-1']}")
    assert found == ["controllers.endpoints[0]: 'http://ctl-1' has no port; write it as host:port"]


def test_rpc_needs_controllers(tmp_path):
    found = problems(tmp_path, "options: {remoteUpdateMode: rpc}")
    assert found[0].startswith("controllers: is required when options.remoteUpdateMode is RPC")


def test_store_mode_is_refused_clearly(tmp_path):
    found = problems(tmp_path, "zookeeper: {connectionString: 'zk:2181'}")
    assert found == [
        "options.remoteUpdateMode: STORE (ZooKeeper) is not supported yet; "
        "set it to RPC and list controllers.endpoints"
    ]


def test_secrets_must_be_unique_and_non_empty(tmp_path):
    found = problems(
        tmp_path,
        """
        clusterAuth:
          secrets:
            - {nodeType: CONTROLLER, secret: same}
            - {nodeType: EXECUTOR, secret: same}
            - {nodeType: ROBOT, secret: x}
            - {nodeType: EXECUTOR, secret: ''}
        """,
    )
    assert "clusterAuth.secrets[2].nodeType: 'ROBOT' is not one of CONTROLLER, EXECUTOR" in found
    assert "clusterAuth.secrets[3].secret: is required and must not be empty" in found
    assert "clusterAuth.secrets: secrets must be unique" in found


def test_enums_are_case_insensitive(tmp_path):
    cfg = load(tmp_path, "options: {imagePullPolicy: always}")
    assert cfg.options.image_pull_policy is ImagePullPolicy.ALWAYS


def test_docker_auth_and_metadata(tmp_path):
    cfg = load(
        tmp_path,
        """
        dockerAuth:
          entries:
            "127.0.0.1:5000": {type: CREDENTIALS, username: u, password: p}
        resources:
          tags: [gpu]
          metadata:
            blacklistedKeys: ["^secret"]
            metadataProviders:
              static: {type: CONFIGURED, metadata: {rack: r1, secretKey: x}}
        """,
    )
    assert cfg.docker_auth["127.0.0.1:5000"].username == "u"
    assert cfg.resources.metadata == {"rack": "r1"}
    assert cfg.resources.tags == ("gpu",)


def test_not_a_mapping(tmp_path):
    assert problems(tmp_path, "- a\n- b\n") == ["(top level): must be a mapping, not list"]


def test_invalid_yaml_names_the_line(tmp_path):
    found = problems(tmp_path, "server:\n  port: [1,\n")
    assert len(found) == 1
    assert "line 3" in found[0]
    assert "not valid YAML" in found[0]


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_config(tmp_path / "nope.yaml")


def test_parse_config_accepts_integers_with_underscores():
    cfg = parse_config({"options": {"maxOpenFiles": "10_000"}})
    assert cfg.options.max_open_files == 10000


def test_variables_in_comments_are_not_substituted(tmp_path):
    cfg = load(
        tmp_path,
        "# set ${UNSET} here\noptions: {hostname: 'a#${H}'}  # ${ALSO_UNSET}\n",
        env={"H": "x"},
    )
    assert cfg.options.hostname == "a#x"
