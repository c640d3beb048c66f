"""TLS material made at test time: X.509 certificates with certtool."""
import shutil
import subprocess

import pytest


def certtool(*args, cwd):
    r = subprocess.run(["certtool"] + list(args), cwd=cwd, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, timeout=120)
    if r.returncode != 0:
        pytest.fail(f"certtool {' '.join(args)}: {r.stdout.decode(errors='replace')}")


def make_ca(d, cn):
    d.mkdir(parents=True, exist_ok=True)
    (d / "ca.info").write_text(f'cn = "{cn}"\nca\ncert_signing_key\nexpiration_days = 3\n')
    certtool("--generate-privkey", "--outfile", "ca-key.pem", cwd=d)
    certtool("--generate-self-signed", "--load-privkey", "ca-key.pem",
             "--template", "ca.info", "--outfile", "ca-cert.pem", cwd=d)


def make_cert(ca, d, prefix, template):
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{prefix}.info").write_text(template)
    certtool("--generate-privkey", "--outfile", f"{prefix}-key.pem", cwd=d)
    certtool("--generate-certificate", "--load-ca-certificate", str(ca / "ca-cert.pem"),
             "--load-ca-privkey", str(ca / "ca-key.pem"), "--load-privkey", f"{prefix}-key.pem",
             "--template", f"{prefix}.info", "--outfile", f"{prefix}-cert.pem", cwd=d)
    shutil.copy(ca / "ca-cert.pem", d / "ca-cert.pem")
