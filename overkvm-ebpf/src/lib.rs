#![no_std]
// An empty library target, so that cargo can resolve this crate as a build-dependency.
