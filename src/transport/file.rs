//! File upstream (being written).
