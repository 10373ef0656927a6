//! Inbound SMTP (being written).
