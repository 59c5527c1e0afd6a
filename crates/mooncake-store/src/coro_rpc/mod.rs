//! Mooncake's own master protocol: coro_rpc framing with struct_pack bodies, as Mooncake's
//! C++ `MasterClient` (inside its Python `MooncakeDistributedStore`) and `mooncake_master`
//! speak it. Sans-IO: [`frame`] reads and writes headers, [`struct_pack`] bodies, and
//! [`messages`] names the functions and their types.

pub mod frame;
pub mod messages;
pub mod struct_pack;
