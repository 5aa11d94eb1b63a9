//! The udp backend data path.
