//! End-to-end tests of the pool: they start the real daemons (`storaged`, `hostd`,
//! `poold`) as processes and drive them as users do. Helpers shared by those tests live
//! here; the tests themselves are under `tests/tests/`.
