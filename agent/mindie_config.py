"""MindIE's generated files: the service config (`config.json`, named by
`MIES_CONFIG_JSON_PATH`) and, over several nodes, the rank table (`RANKTABLEFILE`).

Every field MindIE's documentation marks as required is written, and the ones real
deployments set beside them (MindIE-LLM "配置参数说明（服务化）", the service's config.json
reference). Values with a meaning for the instance come from it: addresses and ports, the
NPUs (numbered from 0 after `ASCEND_RT_VISIBLE_DEVICES`), the context length, the served
name and the weights' path. The rest are the documented defaults, except where the
documentation's default would refuse to start without files we do not ship (HTTPS
certificates) or changes what the router relies on (`openAiSupport`).

tests/agent/mindie/required_fields.json lists the fields with their types, ranges and
sources; tests/agent/test_mindie_config.py checks every MindIE case against it.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any, Final

from agent.assignment import Instance
from agent.errors import CommandError

# `maxSeqLen` when the instance has no context length (the controller normally sets one)
DEFAULT_MAX_SEQ_LEN: Final = 8192
# the documented upper bound of `maxInputTokenLen` and `maxPrefillTokens`
MAX_INPUT_TOKENS: Final = 4194304
# the documented port range of `port`, `managementPort`, `metricsPort`, `multiNodesInferPort`
PORTS: Final = (1024, 65535)
# `modelName`: letters, digits, `-`, `.` and `_`, not first or last; 256 characters at most
MODEL_NAME: Final = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,254}[A-Za-z0-9])?$")

# documented defaults (each field's range is in the field reference)
TIMEOUT_SECONDS: Final = 600  # tokenTimeout and e2eTimeout
SCHEDULE: Final[dict[str, Any]] = {
    "templateType": "Standard", "templateName": "Standard_LLM", "cacheBlockSize": 128,
    "maxPrefillBatchSize": 50, "prefillTimeMsPerReq": 150, "prefillPolicyType": 0,
    "decodeTimeMsPerReq": 50, "decodePolicyType": 0, "maxBatchSize": 200,
    "maxPreemptCount": 0, "supportSelectBatch": False, "maxQueueDelayMicroseconds": 5000,
}


def service_config(inst: Instance, model_path: str) -> dict[str, Any]:
    """The config of one MindIE instance, or of one node's part of a replica over nodes
    (with the settings between the nodes: port + 3, TLS off)."""
    _check(inst)
    npus = max(len(inst.devices.indices), 1)
    seq_len = inst.context or DEFAULT_MAX_SEQ_LEN
    # MindIE takes min(maxInputTokenLen, maxSeqLen - 1) itself; a prompt may fill the context
    input_len = min(seq_len, MAX_INPUT_TOKENS)
    over_nodes = inst.role != "single"
    server: dict[str, Any] = {
        "ipAddress": inst.host, "managementIpAddress": inst.host,
        "port": inst.port, "managementPort": inst.port + 1, "metricsPort": inst.port + 2,
        "allowAllZeroIpListening": ipaddress.ip_address(inst.host).is_unspecified,
        "maxLinkNum": 1000, "httpsEnabled": False, "inferMode": "standard",
        # the router speaks to /v1/chat/completions as to vLLM's
        "openAiSupport": "vllm",
        "tokenTimeout": TIMEOUT_SECONDS, "e2eTimeout": TIMEOUT_SECONDS,
        "distDPServerEnabled": False,
    }
    backend: dict[str, Any] = {
        "backendName": "mindieservice_llm_engine", "modelInstanceNumber": 1,
        "npuDeviceIds": [list(range(npus))], "tokenizerProcessNumber": 8,
        "multiNodesInferEnabled": over_nodes,
        "ModelDeployConfig": {
            "maxSeqLen": seq_len, "maxInputTokenLen": input_len, "truncation": False,
            "ModelConfig": [{
                "modelInstanceType": "Standard", "modelName": inst.model,
                "modelWeightPath": model_path, "worldSize": npus,
                # no CPU swap space: it is only used when requests may be preempted
                "cpuMemSize": 0, "npuMemSize": -1, "backendType": "atb",
                "trustRemoteCode": False,
            }],
        },
        # a whole prompt fits one prefill, and a reply may fill the context
        "ScheduleConfig": {**SCHEDULE, "maxPrefillTokens": input_len, "maxIterTimes": seq_len},
    }
    if over_nodes:
        # TLS between the nodes off: docs/security.md
        server["interCommTLSEnabled"] = False
        backend.update({"multiNodesInferPort": inst.port + 3, "interNodeTLSEnabled": False})
    return {"Version": "1.0.0", "ServerConfig": server, "BackendConfig": backend,
            "LogConfig": {"dynamicLogLevelValidHours": 2}}


def _check(inst: Instance) -> None:
    """Refuse what MindIE's documentation refuses, with the instance's own words."""
    last = inst.port + (3 if inst.role != "single" else 2)
    why, hint = "", ""
    if not _is_ip(inst.host):
        why = f"has `host` {inst.host!r}, but MindIE binds to an IP address only"
        hint = "set the node's `address` in stack.toml to its private IP address."
    elif not PORTS[0] <= inst.port or last > PORTS[1]:
        why = (f"has `port` {inst.port}, but MindIE needs it and the next "
               f"{last - inst.port} ports within {PORTS[0]}-{PORTS[1]}")
        hint = "run `stack plan` and `stack apply` again: placement picks ports from 1024 up."
    elif not MODEL_NAME.match(inst.model):
        why = (f"serves the model name {inst.model!r}, which MindIE refuses as `modelName` "
               "(letters, digits, `-`, `.` and `_`, not first or last; 256 at most)")
        hint = "rename the model in stack.toml, e.g. `[models.qwen-7b]`."
    if why:
        raise CommandError(f"MindIE instance `{inst.id}` {why}", hint=hint)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def rank_table(inst: Instance) -> dict[str, Any]:
    """The rank table of a replica over several nodes (MindIE service deployment guide,
    multi-node inference): every node's NPUs by physical id with their device IPs, ranks
    counted over the nodes in order, the main first. The same on every part."""
    _check(inst)
    table = inst.rank_table
    me = str(ipaddress.ip_address(inst.host))
    hosts = [server.host for server in table or []]
    why = ("has no `rank_table`" if not table else
           "lists a node twice in its `rank_table`" if len(set(hosts)) != len(hosts) else
           "is not in its own `rank_table`" if me not in hosts else
           "is the main but not the first server of its `rank_table`"
           if (inst.role == "main") != (hosts[0] == me) else
           f"has NPUs {inst.devices.indices} but its `rank_table` lists others"
           if [d.device_id for d in table[hosts.index(me)].devices] != inst.devices.indices
           else "")
    if why or table is None:
        raise CommandError(
            f"MindIE instance `{inst.id}` runs over several nodes but {why}",
            hint="the controller writes it from each NPU's device IP (/etc/hccn.conf) and "
                 "the nodes' addresses; run `stack plan` and `stack apply` again.")
    servers, rank = [], 0
    for server in table:
        devices = []
        for device in server.devices:
            devices.append({"device_id": str(device.device_id), "device_ip": device.device_ip,
                            "rank_id": str(rank)})
            rank += 1
        servers.append({"server_id": server.host, "container_ip": server.host,
                        "device": devices})
    return {"version": "1.0", "status": "completed", "server_count": str(len(servers)),
            "server_list": servers}
