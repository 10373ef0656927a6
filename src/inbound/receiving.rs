//! The message being received after `354` (sans-IO): the DATA reader and the header scan over one bounded buffer, with `Received:` written first and a missing `Message-ID:`/`Date:` inserted where the header section ends.
//!
//! The buffer holds at most [`BODY_BUFFER`] bytes (plus a few): when it is
//! full the session asks the driver to write it to the message file
//! ([`super::session::Step::Write`]). Only an undecided header line (at most
//! [`crate::message::headers::MAX_NAME`] + 1 bytes) stays behind, so fields
//! can still be inserted before it. Nothing of the body is ever copied to
//! add a field.

use super::data::{DataOutcome, DataReader, HeaderInfo, HeaderScan};

/// The largest buffer of received message bytes a session holds before
/// they are written out.
pub const BODY_BUFFER: usize = 64 * 1024;

/// One message in DATA.
#[derive(Debug)]
pub(super) struct Receiving {
    /// The queue id, given at `DATA`.
    pub id: String,
    reader: DataReader,
    scan: HeaderScan,
    /// Output bytes not yet handed to the driver.
    buf: Vec<u8>,
    /// Output bytes handed out so far (offset of `buf[0]`).
    flushed: u64,
    /// Output bytes in front of the message's own bytes (`Received:`).
    shift: u64,
    /// What a missing `Message-ID:` and `Date:` become.
    message_id: String,
    date: String,
    /// The `Message-ID:` value this message has (its own or the added one).
    pub final_message_id: Option<String>,
    /// The driver could not write; why (the message is read to its end, then refused).
    pub failed: Option<super::SinkError>,
    /// The most `buf` ever held.
    pub high_water: usize,
}

impl Receiving {
    /// A message with queue id `id`, `received` (the whole field, CRLF
    /// included) on top; `message_id` and `date` are added when missing.
    pub fn new(
        id: String,
        reader: DataReader,
        received: &[u8],
        message_id: String,
        date: String,
    ) -> Self {
        let mut buf = Vec::with_capacity(BODY_BUFFER.min(16 * 1024));
        buf.extend_from_slice(received);
        Receiving {
            id,
            reader,
            scan: HeaderScan::new(),
            high_water: buf.len(),
            shift: buf.len() as u64,
            buf,
            flushed: 0,
            message_id,
            date,
            final_message_id: None,
            failed: None,
        }
    }

    /// Consume `input` (see [`DataReader::feed`]); stops early when the
    /// buffer is full ([`Self::full`]).
    pub fn feed(&mut self, input: &[u8]) -> (usize, Option<DataOutcome>) {
        let before = self.buf.len();
        let (n, outcome) = self.reader.feed(input, &mut self.buf, BODY_BUFFER);
        if self.scan.end().is_none() {
            let new = self.buf.len() - before;
            // The scan sees only the message's own bytes; fields are
            // inserted once, at the end of the section.
            if let Some(end) = self.scan.push(&self.buf[before..before + new]) {
                self.insert_fields(end);
            }
        }
        if outcome == Some(DataOutcome::Complete) && self.scan.end().is_none() {
            let end = self.scan.finish();
            self.insert_fields(end);
        }
        self.high_water = self.high_water.max(self.buf.len());
        if self.reader.over_limit() || self.failed.is_some() {
            // Refused at the end whatever comes: keep nothing.
            self.buf.clear();
        }
        (n, outcome)
    }

    /// The buffer is full: hand it out before feeding more.
    pub fn full(&self) -> bool {
        self.buf.len() >= BODY_BUFFER
    }

    /// The bytes that can be written now, in exchange for `spare` (an
    /// emptied buffer from the last call, so no buffer is allocated per
    /// write). An undecided header line stays behind.
    pub fn take(&mut self, mut spare: Vec<u8>) -> Vec<u8> {
        let keep_from = match self.scan.hold() {
            Some(hold) => {
                ((hold + self.shift).saturating_sub(self.flushed) as usize).min(self.buf.len())
            }
            None => self.buf.len(),
        };
        spare.clear();
        spare.extend_from_slice(&self.buf[keep_from..]);
        self.buf.truncate(keep_from);
        self.flushed += keep_from as u64;
        std::mem::replace(&mut self.buf, spare)
    }

    /// What the header section said (once the data is complete).
    pub fn info(&self) -> &HeaderInfo {
        self.scan.info()
    }

    /// The rest of the message, once the data is complete.
    pub fn into_tail(self) -> Vec<u8> {
        self.buf
    }

    /// The header section ended at `end`: insert the missing fields there
    /// (and an empty line when a non-header line ended it).
    fn insert_fields(&mut self, end: super::data::HeaderEnd) {
        let info = self.scan.info();
        let mut added = String::new();
        match &info.message_id {
            Some(existing) => self.final_message_id = Some(existing.clone()),
            None => {
                added.push_str(&format!("Message-ID: {}\r\n", self.message_id));
                self.final_message_id = Some(self.message_id.clone());
            }
        }
        if !info.has_date {
            added.push_str(&format!("Date: {}\r\n", self.date));
        }
        if !end.separated {
            added.push_str("\r\n");
        }
        let at = (end.at + self.shift).saturating_sub(self.flushed) as usize;
        let at = at.min(self.buf.len());
        self.buf.splice(at..at, added.bytes());
        self.shift += added.len() as u64;
    }
}
