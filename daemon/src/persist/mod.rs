//! What survives the daemon: the generation table in the state directory, the maps
//! pinned on the host's bpffs, and the directories root can trust to hold them.

pub mod dirs;
pub mod pins;
pub mod state;
