"""Credentials to try a TLS federation with node authentication on one machine.

A consortium uses its own PKI; these are what :class:`fedblood.deploy.local.Federation` and
``python -m fedblood.deploy.credentials certs DIR`` / ``keys DIR NAME...`` make for 127.0.0.1.
"""

import datetime
import sys
from pathlib import Path


def make_certificates(directory: Path) -> tuple[Path, Path, Path]:
  """A CA and a server certificate for 127.0.0.1/localhost: ``(ca.crt, server.pem, server.key)``."""
  from cryptography import x509  # pylint: disable=g-import-not-at-top
  from cryptography.hazmat.primitives import hashes, serialization
  from cryptography.hazmat.primitives.asymmetric import ec
  from cryptography.x509.oid import NameOID
  import ipaddress  # pylint: disable=g-import-not-at-top
  directory.mkdir(parents=True, exist_ok=True)
  now = datetime.datetime.now(datetime.timezone.utc)

  def cert(subject, issuer, key, signer, ca: bool, san=None):
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=2))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if san:
      builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(signer, hashes.SHA256())

  name = lambda cn: x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
  ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
  ca = cert(name('fedblood test CA'), name('fedblood test CA'), ca_key, ca_key, True)
  san = [x509.DNSName('localhost'), x509.IPAddress(ipaddress.ip_address('127.0.0.1'))]
  server = cert(name('127.0.0.1'), ca.subject, key, ca_key, False, san)
  paths = directory / 'ca.crt', directory / 'server.pem', directory / 'server.key'
  paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
  paths[1].write_bytes(server.public_bytes(serialization.Encoding.PEM))
  paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.TraditionalOpenSSL,
                                         serialization.NoEncryption()))
  return paths


def make_node_key(directory: Path, name: str) -> tuple[Path, Path]:
  """An ECDSA key pair in OpenSSH format (what Flower's node authentication reads)."""
  from cryptography.hazmat.primitives import serialization  # pylint: disable=g-import-not-at-top
  from cryptography.hazmat.primitives.asymmetric import ec
  key = ec.generate_private_key(ec.SECP384R1())
  private, public = directory / name, directory / f'{name}.pub'
  private.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                        serialization.PrivateFormat.OpenSSH,
                                        serialization.NoEncryption()))
  private.chmod(0o600)
  public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                   serialization.PublicFormat.OpenSSH))
  return private, public


def main(argv) -> None:
  """``certs DIR``: a CA + server certificate for 127.0.0.1/localhost (trying it on one
  machine; a consortium uses its own PKI). ``keys DIR NAME...``: a node key pair per name."""
  if len(argv) >= 2 and argv[0] == 'certs':
    print('\n'.join(map(str, make_certificates(Path(argv[1])))))
  elif len(argv) >= 3 and argv[0] == 'keys':
    Path(argv[1]).mkdir(parents=True, exist_ok=True)
    for name in argv[2:]:
      print('\n'.join(map(str, make_node_key(Path(argv[1]), name))))
  else:
    raise SystemExit('usage: python -m fedblood.deploy.credentials certs DIR | keys DIR NAME...')


if __name__ == '__main__':
  main(sys.argv[1:])
