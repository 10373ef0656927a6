//! SMTP/SMTPS upstream (being written).
