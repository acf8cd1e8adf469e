import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOEmbedded
import NIOWebSocket
import Testing
@testable import ParleyWorkBuildbot

/// The end of a worker's connection against what the worker sent before it: the master
/// serves the worker's requests in order in a task of their own, so the end (a close frame,
/// the end of the stream, the master's own close) can come while some wait to be served.
@Suite struct BuildbotConnectionEndTests {
    /// A transfer whose writes wait until `release` (a submitter that stopped answering).
    final class StuckTransfer: BuildbotTransfer, Sendable {
        let writes = NIOLockedValueBox(0)
        let gate = NIOLockedValueBox<(open: Bool, waiters: [CheckedContinuation<Void, Never>])>((false, []))
        func write(_ bytes: [UInt8]) async throws {
            self.writes.withLockedValue { $0 += 1 }
            await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
                let open = self.gate.withLockedValue { g -> Bool in
                    if !g.open { g.waiters.append(c) }
                    return g.open
                }
                if open { c.resume() }
            }
        }
        func release() {
            let waiters = self.gate.withLockedValue { g in
                g.open = true
                defer { g.waiters = [] }
                return g.waiters
            }
            for w in waiters { w.resume() }
        }
        func closeWrite() async throws {}
        func setTimes(access: Double, modified: Double) async throws {}
        func read(length: Int) async throws -> [UInt8] { [] }
        func closeRead() async throws {}
    }

    /// Starts a command on `connection` and answers its start_command as the worker.
    static func started(_ connection: BuildbotConnection, _ channel: NIOAsyncTestingChannel, transfer: (any BuildbotTransfer)? = nil) async throws -> (id: String, events: AsyncThrowingStream<BuildbotCommandEvent, any Error>) {
        let starting = Task { try await connection.start("upload_file", args: .nil, transfer: transfer) }
        let frame = try await channel.waitForOutboundWrite(as: WebSocketFrame.self)
        var data = frame.data
        let sent = try BuildbotMessage.parse(try MessagePack.decode(data.readBytes(length: data.readableBytes) ?? []))
        guard case .request("start_command", let seq, _) = sent else { Issue.record("not a start_command: \(sent)"); throw CancellationError() }
        try connection.received(.response(seq: seq, result: .nil, isException: false))
        return try await starting.value
    }

    /// A connection (its call timeout 30 s) running an upload whose first chunk, received,
    /// waits on its transfer until that is released.
    static func uploadingAChunk() async throws -> (NIOAsyncTestingChannel, BuildbotConnection, StuckTransfer, String, AsyncThrowingStream<BuildbotCommandEvent, any Error>) {
        let channel = NIOAsyncTestingChannel()
        let connection = BuildbotConnection(worker: "w", channel: channel, callTimeout: .seconds(30), logger: Logger(label: "test"))
        let transfer = StuckTransfer()
        let (id, events) = try await Self.started(connection, channel, transfer: transfer)
        try connection.received(.request(op: "update_upload_file_write", seq: 0, body: .object(["command_id": .string(id), "args": .binary([1, 2, 3])])))
        return (channel, connection, transfer, id, events)
    }

    /// What a command's events came to: its end (nil: completed without a failure text), or
    /// the error they ended with.
    static func outcome(_ events: AsyncThrowingStream<BuildbotCommandEvent, any Error>) async -> Result<String?, any Error> {
        do {
            var end: String??
            for try await event in events { if case .complete(let failure) = event { end = .some(failure) } }
            guard let end else { return .failure(CancellationError()) }
            return .success(end)
        } catch {
            return .failure(error)
        }
    }

    /// A command's `complete` received before the worker's close (in the same read, while
    /// the requests before it wait to be served: here a chunk whose transfer is slow): the
    /// command ended (its events say so, after its chunk), it was not lost with the connection.
    @Test func aCompleteReceivedBeforeTheEndIsDelivered() async throws {
        let (channel, connection, transfer, id, events) = try await Self.uploadingAChunk()
        defer { transfer.release() }
        try connection.received(.request(op: "update", seq: 1, body: .object(["command_id": .string(id), "args": .array([.array(["rc", 0])])])))
        try connection.received(.request(op: "complete", seq: 2, body: .object(["command_id": .string(id), "args": .nil])))
        #expect(!connection.isRunning(id), "a command whose complete was received is not running")
        connection.finish(reason: "the worker closed the WebSocket")
        transfer.release()
        let outcome = await Self.outcome(events)
        guard case .success(nil) = outcome else { Issue.record("the command's end was lost: \(outcome)"); return }
        #expect(transfer.writes.withLockedValue { $0 } == 1)
        await connection.closed()
        _ = try? await channel.finish()
    }

    /// A request being served when the connection ends waits on a transfer that does not
    /// answer: the end is held up by it for the call timeout at most, then the command fails
    /// and `closed()` returns (the session's cleanup runs).
    @Test func aTransferStuckAtTheEndHoldsItUpForTheCallTimeoutOnly() async throws {
        let (channel, connection, transfer, _, events) = try await Self.uploadingAChunk()
        defer { transfer.release() }
        for _ in 0..<200 where transfer.writes.withLockedValue({ $0 }) == 0 { try await Task.sleep(for: .milliseconds(10)) }
        #expect(transfer.writes.withLockedValue { $0 } == 1)
        connection.finish(reason: "the worker went away")
        // The testing loop's clock moves only when told: past the call timeout.
        await channel.testingEventLoop.advanceTime(by: .seconds(31))
        // Bounded: a closed() that never returned would be resumed by the release (defer).
        let ended = NIOLockedValueBox(false)
        let waiter = Task {
            await connection.closed()
            ended.withLockedValue { $0 = true }
        }
        for _ in 0..<500 where !ended.withLockedValue({ $0 }) { try await Task.sleep(for: .milliseconds(20)) }
        guard ended.withLockedValue({ $0 }) else {
            Issue.record("closed() did not return: the stuck transfer held the connection's end")
            transfer.release()
            return
        }
        let outcome = await Self.outcome(events)
        guard case .failure(let error) = outcome, error is BuildbotConnectionError else { Issue.record("the command did not fail with the connection: \(outcome)"); return }
        transfer.release()
        await waiter.value
        _ = try? await channel.finish()
    }
}
