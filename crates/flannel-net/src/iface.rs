//! Interface and address lookup for choosing the external interface.
