//! What the agent's unit tests share: the recording container runtime and health probe
//! (`runtime`). Compiled for tests only.

pub mod runtime;
