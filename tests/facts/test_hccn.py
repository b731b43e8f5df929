"""Each Ascend NPU's device IP: /etc/hccn.conf parsed strictly, joined to the NPUs of
`npu-smi info` in the node's facts (the `device_ip` a MindIE rank table needs)."""

from __future__ import annotations

import base64
from pathlib import Path

from agent.gpus import parse_hccn_conf
from deploys.facts import node_facts_from

HERE = Path(__file__).parent
NPU_SMI = HERE / "fixtures" / "ascend" / \
    "npu-smi-info_910B4-x2_npu-smi-24.1.1_EXCERPT-truncated.txt"


def test_hccn_conf_gives_each_device_number_its_nic_address() -> None:
    got = parse_hccn_conf((HERE / "hccn" / "hccn.conf").read_text())
    assert got == {0: "192.168.100.101", 1: "192.168.101.101", 2: "192.168.102.101",
                   3: "192.168.103.101", 4: "192.168.100.100", 5: "192.168.101.100",
                   6: "192.168.102.100", 7: "192.168.103.100"}


def test_hccn_conf_keeps_only_ip_addresses_and_the_first_of_a_device() -> None:
    text = ("address_0=10.1.0.1 address_0=10.9.9.9 address_1=fe80::1 address_2=10.1.0.300 "
            "address_3=$(reboot) address_4=host.example address_=10.1.0.5 "
            "address_x=10.1.0.6 netmask_5=255.255.255.0 address_6=10.1.0.7;x "
            "#address_7=10.1.0.8 address_8=10.1.0.9")
    assert parse_hccn_conf(text) == {0: "10.1.0.1", 1: "fe80::1", 8: "10.1.0.9"}


def _raw(hccn: str) -> dict[str, object]:
    out = base64.b64encode(NPU_SMI.read_bytes()).decode()
    return {"os": "linux", "arch": "aarch64", "hccn_conf": hccn,
            "tools": {"npu-smi": {"rc": 0, "enc": "base64", "out": out}}}


def test_an_npu_gets_the_device_ip_of_its_number_and_none_without_one() -> None:
    facts = node_facts_from(_raw("address_0=192.168.100.101"), address="10.0.0.1")
    assert [g.device_ip for g in facts.gpus] == ["192.168.100.101", None]
    # unknown is left out of the record, so facts of hosts without hccn.conf are as before
    assert facts.model_dump(mode="json")["gpus"][0]["device_ip"] == "192.168.100.101"
    assert "device_ip" not in facts.model_dump(mode="json")["gpus"][1]


def test_a_host_without_hccn_conf_has_npus_without_device_ips() -> None:
    facts = node_facts_from(_raw(""), address="10.0.0.1")
    assert [g.device_ip for g in facts.gpus] == [None, None]
