"""The e-mail channel: a plain-text message over SMTP, with STARTTLS or implicit TLS and an optional login.

Certificates are verified against the system's CAs (SSL_CERT_FILE/SSL_CERT_DIR point OpenSSL at a private
CA). The EHLO name is the sidecar's hostname rather than ``socket.getfqdn()``, whose DNS lookup is not
bounded by NOTIFY_TIMEOUT.
"""

from __future__ import annotations

import email.policy
import logging
import smtplib
import ssl
from email.message import EmailMessage
from email.utils import formatdate, make_msgid

from app.logs import mask
from app.notify.events import Event
from app.notify.http import DeliveryError, PermanentDeliveryError

log = logging.getLogger(__name__)

#: Headers stay on one line (RFC 5322 allows 998 characters): the stdlib folder can otherwise move a whole
#: subject onto a continuation line, which some clients show with a leading space.
_POLICY = email.policy.SMTP.clone(max_line_length=998)


class EmailChannel:
    name = "email"

    def __init__(self, host: str, port: int, mail_from: str, mail_to: tuple[str, ...], *, user: str | None = None,
                 password: str | None = None, starttls: bool = True, implicit_tls: bool = False,
                 local_hostname: str = "localhost", context: ssl.SSLContext | None = None) -> None:
        self.host, self.port = host, port
        self.mail_from, self.mail_to = mail_from, mail_to
        self._user, self._password = user, password
        self._starttls, self._implicit_tls = starttls, implicit_tls
        self._local_hostname = local_hostname
        self._context = context

    def describe(self) -> str:
        return f"mail to {len(self.mail_to)} recipient(s) via {self.host}:{self.port}"

    def message(self, event: Event) -> EmailMessage:
        msg = EmailMessage(policy=_POLICY)
        msg["Subject"] = mask(event.subject)
        msg["From"] = self.mail_from
        msg["To"] = ", ".join(self.mail_to)
        msg["Date"] = formatdate(event.at.timestamp(), usegmt=True)
        msg["Message-ID"] = make_msgid("backup-sidecar", domain=self._local_hostname)
        msg["Auto-Submitted"] = "auto-generated"  # RFC 3834: no vacation replies to an unattended sender
        msg["X-Backup-Sidecar-Event"] = event.name
        msg.set_content(mask(event.text))
        return msg

    def send(self, event: Event, timeout: float) -> None:
        msg = self.message(event)
        context = self._context or ssl.create_default_context()
        try:
            if self._implicit_tls:
                smtp: smtplib.SMTP = smtplib.SMTP_SSL(self.host, self.port, local_hostname=self._local_hostname,
                                                      timeout=timeout, context=context)
            else:
                smtp = smtplib.SMTP(self.host, self.port, local_hostname=self._local_hostname, timeout=timeout)
            with smtp:
                smtp.ehlo()
                if self._starttls:
                    smtp.starttls(context=context)
                    smtp.ehlo()
                if self._user:
                    smtp.login(self._user, self._password or "")
                refused = smtp.send_message(msg, from_addr=self.mail_from, to_addrs=list(self.mail_to))
        except ssl.SSLCertVerificationError as exc:
            raise PermanentDeliveryError(mask(f"TLS certificate of {self.host} refused: {exc.verify_message} "
                                              "(hint: SSL_CERT_FILE for a private CA)")) from None
        except smtplib.SMTPAuthenticationError as exc:
            raise PermanentDeliveryError(mask(f"login as {self._user} refused: {exc.smtp_code} "
                                              "(hint: check SMTP_USER and SMTP_PASSWORD)")) from None
        except smtplib.SMTPRecipientsRefused as exc:
            raise PermanentDeliveryError(mask(f"every recipient refused: {_codes(exc.recipients)}")) from None
        except smtplib.SMTPNotSupportedError as exc:
            raise PermanentDeliveryError(mask(f"{self.host} does not support it: {exc} "
                                              "(hint: SMTP_STARTTLS=false or SMTP_SSL=true)")) from None
        except smtplib.SMTPResponseException as exc:
            text = mask(f"{self.host} answered {exc.smtp_code} {_decode(exc.smtp_error)}")
            raise (PermanentDeliveryError(text) if exc.smtp_code >= 500 else DeliveryError(text)) from None
        except (OSError, smtplib.SMTPException) as exc:
            raise DeliveryError(mask(f"{exc.__class__.__name__}: {exc}" if str(exc) else
                                     exc.__class__.__name__)) from None
        if refused:
            # delivered to the others: retrying would send them duplicates, so say so and count it as sent
            log.warning("mail %r: some recipients refused: %s", event.subject, mask(_codes(refused)))


def _decode(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _codes(recipients: dict[str, tuple[int, bytes]]) -> str:
    return ", ".join(f"{addr} ({code} {_decode(text)})" for addr, (code, text) in recipients.items())
