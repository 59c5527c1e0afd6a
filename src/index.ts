/**
 * Mooncake for Node.js: the Transfer Engine (batched one-sided reads and writes between
 * registered memory of processes) and its metadata server.
 *
 * @packageDocumentation
 */
export {
  Batch,
  TransferEngine,
  type BufferDescriptor,
  type NotifyEvent,
  type Segment,
  type TaskStatus,
  type TaskStatusName,
  type TransferEngineOptions,
  type TransferOptions,
  type TransferRequest,
  type TransportStats,
} from './engine'
export { MooncakeError } from './errors'
export { MetadataServer, startMetadataServer, type MetadataServerOptions } from './metadata-server'
