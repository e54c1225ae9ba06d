//! Backend selection; filled in by the balancing work.
