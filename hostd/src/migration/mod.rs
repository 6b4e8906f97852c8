//! Live migration: the authenticated TCP stream that moves a running VM between hosts
//! (pre-copy rounds over the dirty log, then switchover with the saved state).
