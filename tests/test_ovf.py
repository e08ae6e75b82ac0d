"""ovf-env.xml: Azure's input rules, and the rendered XML read back by both agents' real parsers.

The parsers come from the Debian packages (``waagent_lib`` / ``cloudinit_lib`` fixtures, bookworm and trixie):
waagent's ``azurelinuxagent.common.protocol.ovfenv.OvfEnv`` and cloud-init's ``OvfEnvXml`` plus
``DataSourceAzure.read_azure_ovf`` (what the datasource actually calls).
"""

from __future__ import annotations

import base64
import dataclasses
import importlib
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import jinja2
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from imagekit.config import profile as ovf
from imagekit.config.profile import ProvisioningProfile
from imagekit.core.errors import InputError
from imagekit.media import ovf as ovf_xml
from imagekit.media.ovf import render_ovf_env

# Passwords and custom data with XML's special characters, CDATA's terminator and non-ASCII text.
TRICKY_PASSWORD = "  Pä<s&w>\"o'rd]]>1 ✓ "
TRICKY_CUSTOM_DATA = "#cloud-config\n# <&> \"quotes\" 'apos' ]]> äöü ✓ 日本\nruncmd: [[echo, ok]]\n".encode()
BINARY_CUSTOM_DATA = bytes(range(256)) * 3
KEY_COMMENT_TAIL = " <&>\"' ü"  # appended to a key comment


def _openssh(public_key: Any) -> str:
    return str(public_key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode())


@pytest.fixture(scope="module")
def ed25519_pub() -> str:
    return _openssh(ed25519.Ed25519PrivateKey.generate().public_key()) + " alice@example"


@pytest.fixture(scope="module")
def rsa2048_pub() -> str:
    return _openssh(rsa.generate_private_key(65537, 2048).public_key())


@pytest.fixture(scope="module")
def rsa1024_pub() -> str:
    return _openssh(rsa.generate_private_key(65537, 1024).public_key())


@pytest.fixture(scope="module")
def ecdsa_pub() -> str:
    return _openssh(ec.generate_private_key(ec.SECP256R1()).public_key())


def make(ed25519_pub: str, **kw: Any) -> ProvisioningProfile:
    args: dict[str, Any] = {"hostname": "vm-1", "username": "azureuser", "ssh_public_keys": [ed25519_pub]}
    args.update(kw)
    return ProvisioningProfile.create(**args)


def rejects(field: str, fragment: str, **kw: Any) -> InputError:
    """Build a profile that must fail; check the message names ``field`` and says ``fragment``."""
    key = kw.pop("_key")
    with pytest.raises(InputError) as ei:
        make(key, **kw)
    msg = str(ei.value)
    assert msg.startswith(f"{field}:"), msg
    assert fragment in msg, msg
    assert "allowed:" in msg, msg
    return ei.value


# --- the real parsers ------------------------------------------------------------------------------


def waagent_parse(xml_text: str) -> Any:
    mod = importlib.import_module("azurelinuxagent.common.protocol.ovfenv")
    return mod.OvfEnv(xml_text)


def cloudinit_parse(xml_text: str) -> tuple[Any, tuple[dict[str, Any], Any, dict[str, Any]]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # cloud-init imports crypt on Python 3.11
        # The datasource first, as cloud-init loads it: newer helpers.azure has an import cycle through
        # sources.azure that only resolves in that order.
        ds = importlib.import_module("cloudinit.sources.DataSourceAzure")
        helpers = importlib.import_module("cloudinit.sources.helpers.azure")
        return helpers.OvfEnvXml.parse_text(xml_text), ds.read_azure_ovf(xml_text)


def crypt_matches(password: str, hashed: str) -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt

    return crypt.crypt(password, hashed) == hashed


@pytest.mark.parametrize("disable_password_auth", [True, False])
@pytest.mark.parametrize("provision_guest_agent", [True, False])
@pytest.mark.parametrize("custom_data", [TRICKY_CUSTOM_DATA, BINARY_CUSTOM_DATA], ids=["text", "binary"])
def test_every_field_round_trips_through_waagent(
    waagent_lib: Path,
    ed25519_pub: str,
    rsa2048_pub: str,
    disable_password_auth: bool,
    provision_guest_agent: bool,
    custom_data: bytes,
) -> None:
    p = make(
        ed25519_pub,
        hostname="Vm-1.internal",
        username="jane.doe_2",
        ssh_public_keys=[ed25519_pub + KEY_COMMENT_TAIL, rsa2048_pub],
        password=TRICKY_PASSWORD,
        custom_data=custom_data,
        disable_password_auth=disable_password_auth,
        provision_guest_agent=provision_guest_agent,
    )
    env = waagent_parse(render_ovf_env(p))
    assert env.hostname == "Vm-1.internal"
    assert env.username == "jane.doe_2"
    assert env.user_password == TRICKY_PASSWORD
    # waagent keeps CustomData as the base64 text; decoding it must give the bytes back.
    assert base64.b64decode(env.customdata) == custom_data
    assert env.disable_ssh_password_auth is disable_password_auth
    assert env.provision_guest_agent == ("true" if provision_guest_agent else "false")
    path = "$HOME/jane.doe_2/.ssh/authorized_keys"
    assert env.ssh_pubkeys == [(path, k.fingerprint, k.openssh) for k in p.ssh_keys]
    assert [v for _, _, v in env.ssh_pubkeys] == [ed25519_pub + KEY_COMMENT_TAIL, rsa2048_pub]
    for _, fp, value in env.ssh_pubkeys:
        assert value.startswith("ssh-")  # waagent writes only values that start with ssh-
        assert len(fp) == 40


@pytest.mark.parametrize("disable_password_auth", [True, False])
@pytest.mark.parametrize("custom_data", [TRICKY_CUSTOM_DATA, BINARY_CUSTOM_DATA], ids=["text", "binary"])
def test_every_field_round_trips_through_cloud_init(
    cloudinit_lib: Path,
    ed25519_pub: str,
    rsa2048_pub: str,
    disable_password_auth: bool,
    custom_data: bytes,
) -> None:
    p = make(
        ed25519_pub,
        hostname="vm-2",
        username="ops-user",
        ssh_public_keys=[ed25519_pub + KEY_COMMENT_TAIL, rsa2048_pub],
        password=TRICKY_PASSWORD,
        custom_data=custom_data,
        disable_password_auth=disable_password_auth,
    )
    text = render_ovf_env(p)
    env, (md, ud, cfg) = cloudinit_parse(text)
    assert env.hostname == "vm-2"
    assert env.username == "ops-user"
    assert env.password == TRICKY_PASSWORD
    assert env.custom_data == custom_data  # cloud-init base64-decodes CustomData
    assert env.disable_ssh_password_auth is disable_password_auth
    assert env.public_keys == [
        {"fingerprint": k.fingerprint, "path": "$HOME/ops-user/.ssh/authorized_keys", "value": k.openssh}
        for k in p.ssh_keys
    ]
    assert env.preprovisioned_vm is False
    # What the datasource hands on to the rest of cloud-init:
    assert md["local-hostname"] == "vm-2"
    assert ud == custom_data
    assert cfg["ssh_pwauth"] is (not disable_password_auth)
    user = cfg["system_info"]["default_user"]
    assert user["name"] == "ops-user"
    assert user["lock_passwd"] is False
    assert crypt_matches(TRICKY_PASSWORD, user["hashed_passwd"])
    assert [k["value"] for k in cfg["_pubkeys"]] == [ed25519_pub + KEY_COMMENT_TAIL, rsa2048_pub]


def test_optional_elements_are_left_out(waagent_lib: Path, cloudinit_lib: Path, ed25519_pub: str) -> None:
    text = render_ovf_env(make(ed25519_pub))
    assert "UserPassword" not in text and "CustomData" not in text
    env = waagent_parse(text)
    assert env.user_password is None  # waagent then configures sudo NOPASSWD instead of chpasswd
    assert env.customdata is None
    assert env.disable_ssh_password_auth is True
    ci, (_, ud, cfg) = cloudinit_parse(text)
    assert ci.password is None and ci.custom_data is None
    assert ud == ""
    assert "hashed_passwd" not in cfg["system_info"]["default_user"]


def test_password_only_profile_parses(waagent_lib: Path, cloudinit_lib: Path) -> None:
    p = ProvisioningProfile.create(
        hostname="pw-only", username="azureuser", password="Sup3r-secret", disable_password_auth=False
    )
    text = render_ovf_env(p)
    assert "<SSH>" not in text
    env = waagent_parse(text)
    assert env.ssh_pubkeys == [] and env.user_password == "Sup3r-secret"
    ci, _ = cloudinit_parse(text)
    assert ci.public_keys == [] and ci.password == "Sup3r-secret"


# --- ProvisionGuestAgent -------------------------------------------------------------------------


def test_waagent_oracle_rejects_an_empty_provision_guest_agent(waagent_lib: Path, wa_fixtures: Path) -> None:
    """Control: the oracle really does reject ovf-env-3.xml, so passing it means something."""
    exc_mod = importlib.import_module("azurelinuxagent.common.exception")
    with pytest.raises(exc_mod.ProtocolError, match="ProvisionGuestAgent"):
        waagent_parse((wa_fixtures / "ovf-env-3.xml").read_text())
    assert waagent_parse((wa_fixtures / "ovf-env-2.xml").read_text()).provision_guest_agent == "true"


@pytest.mark.parametrize("bad", [None, "", "true", 1, 0])
def test_provision_guest_agent_must_be_a_bool(ed25519_pub: str, bad: Any) -> None:
    with pytest.raises(InputError, match=r"^provision_guest_agent:"):
        make(ed25519_pub, provision_guest_agent=bad)


def test_a_forged_profile_cannot_render_an_empty_provision_guest_agent(ed25519_pub: str) -> None:
    p = make(ed25519_pub)
    object.__setattr__(p, "provision_guest_agent", "")
    with pytest.raises(InputError, match="provision_guest_agent"):
        render_ovf_env(p)


def test_even_a_broken_template_cannot_produce_an_empty_provision_guest_agent(
    ed25519_pub: str, wa_fixtures: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last line of defence: the rendered document is checked, so ovf-env-3.xml can never come out."""
    broken = (wa_fixtures / "ovf-env-3.xml").read_text()
    env = jinja2.Environment(loader=jinja2.DictLoader({ovf_xml.TEMPLATE_NAME: broken}),
                             undefined=jinja2.StrictUndefined)
    monkeypatch.setattr(ovf_xml, "template_environment", lambda: env)
    with pytest.raises(InputError, match="ProvisionGuestAgent came out empty"):
        render_ovf_env(make(ed25519_pub))


def test_template_refuses_a_missing_variable() -> None:
    """StrictUndefined: leaving out provision_guest_agent is an error, not an empty element."""
    template = ovf_xml.template_environment().get_template(ovf_xml.TEMPLATE_NAME)
    values: dict[str, Any] = {
        "hostname": "h",
        "username": "u",
        "password": None,
        "disable_password_auth": "true",
        "public_keys": [],
        "custom_data": None,
    }
    with pytest.raises(jinja2.UndefinedError, match="provision_guest_agent"):
        template.render(**values)
    assert "<wa:ProvisionGuestAgent>false<" in template.render(**values, provision_guest_agent="false")


def test_template_escapes_values() -> None:
    template = ovf_xml.template_environment().get_template(ovf_xml.TEMPLATE_NAME)
    out = template.render(
        hostname="<x>",
        username="a&b",
        password=None,
        disable_password_auth="true",
        public_keys=[],
        custom_data=None,
        provision_guest_agent="true",
    )
    assert "<HostName>&lt;x&gt;</HostName>" in out and "<UserName>a&amp;b</UserName>" in out


# --- layout ---------------------------------------------------------------------------------------


def _paths(root: ET.Element) -> set[str]:
    out: set[str] = set()

    def walk(el: ET.Element, prefix: str) -> None:
        here = f"{prefix}/{el.tag}"
        out.add(here)
        for child in el:
            walk(child, here)

    walk(root, "")
    return out


def test_layout_matches_the_walinuxagent_fixture(wa_fixtures: Path, ed25519_pub: str) -> None:
    ours = _paths(ET.fromstring(render_ovf_env(make(ed25519_pub, password="Passw0rd-x", custom_data=b"x"))))
    theirs = _paths(ET.fromstring((wa_fixtures / "ovf-env-2.xml").read_bytes()))
    # KeyPairs need goal-state certificates, which a local run does not have; everything else is the same.
    assert ours == {p for p in theirs if "KeyPair" not in p}


def test_rendered_document_starts_with_the_xml_declaration(ed25519_pub: str) -> None:
    assert render_ovf_env(make(ed25519_pub)).startswith('<?xml version="1.0" encoding="utf-8"?>\n<Environment ')


# --- validation: hostname ---------------------------------------------------------------------------


@pytest.mark.parametrize("hostname", ["a", "vm-1", "VM1", "web.internal.example", "1host", "a" * 63])
def test_good_hostnames(ed25519_pub: str, hostname: str) -> None:
    assert make(ed25519_pub, hostname=hostname).hostname == hostname


def test_hostname_of_64_characters_in_labels_is_accepted(ed25519_pub: str) -> None:
    name = "a" * 31 + "." + "b" * 32
    assert len(name) == 64
    make(ed25519_pub, hostname=name)


@pytest.mark.parametrize(
    ("hostname", "fragment"),
    [
        ("", "empty"),
        ("a" * 32 + "." + "b" * 32, "longer than Azure's 64"),
        ("vm_1", "characters Azure refuses: '_'"),
        ("vm 1", "characters Azure refuses: ' '"),
        ("vm@1", "characters Azure refuses"),
        ("häst", "characters Azure refuses"),
        ("-vm", "must start with a letter or digit"),
        (".vm", "must start with a letter or digit"),
        ("vm.", "must not end in '.'"),
        ("vm-", "must not end in '-'"),
        ("vm..internal", "empty label"),
        ("a" * 64, "longer than 63"),
    ],
)
def test_bad_hostnames(ed25519_pub: str, hostname: str, fragment: str) -> None:
    rejects("hostname", fragment, _key=ed25519_pub, hostname=hostname)


# --- validation: username ---------------------------------------------------------------------------


@pytest.mark.parametrize("username", ["azureuser", "bob_smith", "j.doe", "_svc", "a1", "x" * 32, "deploy-2"])
def test_good_usernames(ed25519_pub: str, username: str) -> None:
    assert make(ed25519_pub, username=username).username == username


# Azure's disallowed adminUsername values, written out from Azure's documentation of the compute API's
# OSProfile.adminUsername ("Disallowed values: ..."), e.g.
# https://learn.microsoft.com/hu-hu/dotnet/api/microsoft.azure.management.compute.fluent.models.osprofile.adminusername
# https://learn.microsoft.com/en-us/javascript/api/@azure/arm-workloads/osprofile
# Independent of ovf.AZURE_RESERVED_USERNAMES: changing or dropping an entry there fails a case here.
AZURE_DOC_DISALLOWED_USERNAMES = (
    "administrator", "admin", "user", "user1", "test", "user2", "test1", "user3", "admin1", "1", "123", "a",
    "actuser", "adm", "admin2", "aspnet", "backup", "console", "david", "guest", "john", "owner", "root", "server",
    "sql", "support", "support_388945a0", "sys", "test2", "test3", "user4", "user5",
)  # fmt: skip


@pytest.mark.parametrize("username", AZURE_DOC_DISALLOWED_USERNAMES)
def test_every_azure_reserved_username_is_refused(ed25519_pub: str, username: str) -> None:
    # "a name Azure reserves", not merely refused: several (root, adm, backup, sys, ...) are also Linux system
    # accounts, and that other rule must not be what catches them.
    rejects("username", f"{username!r} is a name Azure reserves and refuses", _key=ed25519_pub, username=username)


@pytest.mark.parametrize("username", ["user6", "test4", "admin3", "johnny", "sqladmin", "support_1", "ab", "124"])
def test_names_next_to_the_reserved_ones_are_not_reserved(ed25519_pub: str, username: str) -> None:
    """Not on Azure's list, so not refused as reserved ("124" is refused, but as all digits)."""
    try:
        make(ed25519_pub, username=username)
    except InputError as exc:
        assert "Azure reserves" not in exc.message, exc.message
        assert username == "124", str(exc)


def test_the_reserved_list_is_azures_full_list() -> None:
    assert len(AZURE_DOC_DISALLOWED_USERNAMES) == 32  # the documented list has 32 names
    assert set(AZURE_DOC_DISALLOWED_USERNAMES) == ovf.AZURE_RESERVED_USERNAMES


@pytest.mark.parametrize("username", ["daemon", "bin", "sshd", "www-data", "nobody", "wheel", "sudo", "games"])
def test_linux_system_accounts_are_refused(ed25519_pub: str, username: str) -> None:
    rejects("username", "built-in Linux system account", _key=ed25519_pub, username=username)


@pytest.mark.parametrize(
    ("username", "fragment"),
    [
        ("", "empty"),
        ("x" * 65, "longer than Azure's 64"),
        ("x" * 33, "longer than useradd's limit of 32"),
        ("Alice", "upper case"),
        ("ali@ce", "characters Azure refuses: '@'"),
        ("ali#ce", "characters Azure refuses: '#'"),
        ("ali!ce", "characters Azure refuses: '!'"),
        ("a/b", "characters Azure refuses: '/'"),
        ("a:b", "characters Azure refuses: ':'"),
        ("a(b)", "characters Azure refuses: '()'"),
        ("$svc", "must not start with '$'"),
        ("-svc", "must not start with '-'"),
        ("bob smith", "characters useradd refuses: ' '"),
        ("bób", "characters useradd refuses: 'ó'"),
        ("bob~", "characters useradd refuses: '~'"),
        (".hidden", "must not start with '.'"),
        ("1234", "all digits"),
    ],
)
def test_bad_usernames(ed25519_pub: str, username: str, fragment: str) -> None:
    rejects("username", fragment, _key=ed25519_pub, username=username)


# --- validation: SSH keys --------------------------------------------------------------------------


def test_rsa_2048_and_ed25519_keys_are_accepted(ed25519_pub: str, rsa2048_pub: str) -> None:
    p = make(ed25519_pub, ssh_public_keys=[ed25519_pub, rsa2048_pub])
    assert [(k.key_type, k.bits) for k in p.ssh_keys] == [("ssh-ed25519", 256), ("ssh-rsa", 2048)]
    assert p.ssh_keys[0].comment == "alice@example"


def test_rsa_4096_is_accepted(ed25519_pub: str) -> None:
    key = _openssh(rsa.generate_private_key(65537, 4096).public_key())
    assert make(ed25519_pub, ssh_public_keys=[key]).ssh_keys[0].bits == 4096


def test_short_rsa_key_is_refused(ed25519_pub: str, rsa1024_pub: str) -> None:
    rejects("ssh_public_keys[0]", "RSA key of 1024 bits is too short", _key=ed25519_pub, ssh_public_keys=[rsa1024_pub])


def test_ecdsa_key_is_refused(ed25519_pub: str, ecdsa_pub: str) -> None:
    rejects(
        "ssh_public_keys[1]",
        "'ecdsa-sha2-nistp256' is not accepted by Azure",
        _key=ed25519_pub,
        ssh_public_keys=[ed25519_pub, ecdsa_pub],
    )


def test_private_key_is_refused_without_echoing_it(ed25519_pub: str) -> None:
    private = (
        ed25519.Ed25519PrivateKey.generate()
        .private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
        .decode()
    )
    err = rejects("ssh_public_keys[0]", "private key", _key=ed25519_pub, ssh_public_keys=[private])
    body = private.splitlines()[1]
    assert body not in str(err)


@pytest.mark.parametrize(
    ("mangle", "fragment"),
    [
        (lambda k: "", "empty"),
        (lambda k: "ssh-ed25519", "base64 key data is missing"),
        (lambda k: "ssh-ed25519 ###notbase64###", "not valid base64"),
        (lambda k: "ssh-rsa " + base64.b64encode(b"\x00\x00\x00\x07ssh-rsa garbage").decode(), "does not parse"),
        (lambda k: "ssh-rsa " + k.split()[1], "does not parse"),  # an Ed25519 blob labelled ssh-rsa
        (lambda k: "ssh-dss AAAAB3NzaC1kc3MAAACBAP", "'ssh-dss' is not accepted by Azure"),
        (lambda k: 'command="x" ' + k, "does not start with a key type"),
        (lambda k: k + "\nssh-ed25519 AAAA", "more than one line"),
        (lambda k: k + " bad\x07comment", "control characters"),
    ],
)
def test_malformed_keys_are_refused(ed25519_pub: str, mangle: Any, fragment: str) -> None:
    rejects("ssh_public_keys[0]", fragment, _key=ed25519_pub, ssh_public_keys=[mangle(ed25519_pub)])


def test_a_key_must_be_text(ed25519_pub: str) -> None:
    rejects("ssh_public_keys[0]", "expected the key as text", _key=ed25519_pub, ssh_public_keys=[ed25519_pub.encode()])


def test_disabled_password_auth_needs_a_key(ed25519_pub: str) -> None:
    rejects("ssh_public_keys", "no SSH public key", _key=ed25519_pub, ssh_public_keys=[], password="Passw0rd-x")


def test_no_key_and_no_password_is_refused(ed25519_pub: str) -> None:
    rejects(
        "ssh_public_keys",
        "neither an SSH public key nor a password",
        _key=ed25519_pub,
        ssh_public_keys=[],
        disable_password_auth=False,
    )


def test_a_bare_string_is_one_key_not_a_list_of_characters(ed25519_pub: str) -> None:
    p = ProvisioningProfile(hostname="h", username="azureuser", ssh_public_keys=ed25519_pub)  # type: ignore[arg-type]
    assert p.ssh_public_keys == (ed25519_pub,) and len(p.ssh_keys) == 1


# --- validation: password ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "password",
    [
        "abcDE1",  # 6 characters, lower+upper+digit
        "abcde1!",  # lower+digit+special
        "ABCDE1_",  # upper+digit+special ('_' counts as special: [\W_])
        "abcDE!",  # lower+upper+special
        "Aa1" + "x" * 69,  # 72 characters
        TRICKY_PASSWORD,
        "Ünïcödé-1",
    ],
)
def test_good_passwords(ed25519_pub: str, password: str) -> None:
    assert make(ed25519_pub, password=password).password == password


@pytest.mark.parametrize(
    ("password", "fragment"),
    [
        ("aB1!x", "shorter than 6"),
        ("Aa1!" + "x" * 69, "longer than 72"),
        ("abcdefgh", "lacks: upper case, digit, special"),
        ("abcdEFGH", "lacks: digit, special"),
        ("abcd1234", "lacks: upper case, special"),
        ("abcd!@#$", "lacks: upper case, digit"),
        ("ABCD1234", "lacks: lower case, special"),
        ("ABCD!@#$", "lacks: lower case, digit"),
        ("1234!@#$", "lacks: lower case, upper case"),
        ("Abc1!\nxyz", "control"),
        ("Abc1!\x00xyz", "control"),
        ("Abc1!\txyz", "control"),
        ("Abc1!\x7fxyz", "control"),
    ],
)
def test_bad_passwords(ed25519_pub: str, password: str, fragment: str) -> None:
    err = rejects("password", fragment, _key=ed25519_pub, password=password)
    assert password not in str(err)
    assert password.strip() not in repr(err)


def test_the_disallowed_password_list_is_azures_full_list() -> None:
    assert len(ovf.AZURE_DISALLOWED_PASSWORDS) == 10
    assert {"abc@123", "P@$$w0rd", "P@ssw0rd", "Password1", "iloveyou!"} <= ovf.AZURE_DISALLOWED_PASSWORDS


def test_password_must_be_text(ed25519_pub: str) -> None:
    rejects("password", "expected text, got bytes", _key=ed25519_pub, password=b"Passw0rd-x")


@pytest.mark.parametrize("password", sorted(ovf.AZURE_DISALLOWED_PASSWORDS))
def test_every_azure_disallowed_password_is_refused(ed25519_pub: str, password: str) -> None:
    err = rejects("password", "Azure's disallowed passwords", _key=ed25519_pub, password=password)
    assert password not in str(err)


def test_password_never_shows_in_repr_or_str(ed25519_pub: str) -> None:
    p = make(ed25519_pub, password="Zz9-unique-secret", custom_data=b"custom-secret-payload")
    for text in (repr(p), str(p)):
        assert "Zz9-unique-secret" not in text
        assert "custom-secret-payload" not in text


# --- validation: custom data -------------------------------------------------------------------------


def test_custom_data_up_to_azures_limit_is_accepted(ed25519_pub: str, waagent_lib: Path) -> None:
    data = b"x" * ovf.CUSTOM_DATA_MAX
    env = waagent_parse(render_ovf_env(make(ed25519_pub, custom_data=data)))
    assert base64.b64decode(env.customdata) == data


def test_custom_data_over_azures_limit_is_refused(ed25519_pub: str) -> None:
    assert ovf.CUSTOM_DATA_MAX == 65535
    rejects("custom_data", "65536 bytes is over Azure's limit", _key=ed25519_pub, custom_data=b"x" * 65536)


@pytest.mark.parametrize(("data", "fragment"), [(b"", "empty"), ("text", "expected bytes")])
def test_bad_custom_data(ed25519_pub: str, data: Any, fragment: str) -> None:
    rejects("custom_data", fragment, _key=ed25519_pub, custom_data=data)


# --- from files -------------------------------------------------------------------------------------


def test_from_files(tmp_path: Path, ed25519_pub: str, rsa2048_pub: str) -> None:
    keys = tmp_path / "keys.pub"
    keys.write_text(f"# my keys\n\n{ed25519_pub}\n{rsa2048_pub}\n")
    pw = tmp_path / "pw"
    pw.write_text("Secr3t pass with spaces \r\n")
    cd = tmp_path / "cd"
    cd.write_bytes(TRICKY_CUSTOM_DATA)
    p = ProvisioningProfile.from_files(
        hostname="h1", username="azureuser", ssh_key_files=[keys], password_file=pw, custom_data_file=cd
    )
    assert p.ssh_public_keys == (ed25519_pub, rsa2048_pub)
    assert p.password == "Secr3t pass with spaces "  # only the line ending is dropped
    assert p.custom_data == TRICKY_CUSTOM_DATA


def test_from_files_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"^ssh_key: cannot read .*nope\.pub: No such file"):
        ProvisioningProfile.from_files(hostname="h", username="azureuser", ssh_key_files=[tmp_path / "nope.pub"])
    with pytest.raises(InputError, match=r"^password_file: cannot read .*: Is a directory"):
        ProvisioningProfile.from_files(hostname="h", username="azureuser", password_file=tmp_path)
    empty = tmp_path / "empty.pub"
    empty.write_text("# nothing\n")
    with pytest.raises(InputError, match="holds no key"):
        ProvisioningProfile.from_files(hostname="h", username="azureuser", ssh_key_files=[empty])
    bad = tmp_path / "bad.pub"
    bad.write_bytes(b"\xff\xfe")
    with pytest.raises(InputError, match="not UTF-8"):
        ProvisioningProfile.from_files(hostname="h", username="azureuser", ssh_key_files=[bad])


def test_profile_is_frozen(ed25519_pub: str) -> None:
    p = make(ed25519_pub)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.hostname = "other"  # type: ignore[misc]
