//! The gRPC services every member serves: [`pool`] (PoolService), [`agent`]
//! (HostAgentService, hostd's heartbeats) and [`peer`] (CoordinatorPeerService, Raft).

pub mod agent;
pub mod peer;
pub mod pool;
