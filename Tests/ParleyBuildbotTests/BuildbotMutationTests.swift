import Foundation
import Logging
import NIOCore
import NIOEmbedded
import NIOWebSocket
import ParleyTestSupport
import Testing
@testable import ParleyWorkBuildbot

/// What a worker sends above MessagePack, made up: messages, updates and requests whose
/// fields have any shape (random MessagePack values where the protocol has numbers,
/// strings and lists), and real messages with their encoded bytes mutated. Each is read or
/// refused with a reason (`BuildbotMessage.parse`, `BuildbotUpdate.parse`), and fed to a
/// connection running a command: the connection answers or refuses every request, the
/// command's events end, and the connection's end returns. `PARLEY_BUILDBOT_MUTATIONS`
/// variants (default 2,000).
@Suite(.timeLimit(.minutes(3)))
struct BuildbotMutationTests {
    static let variants = ProcessInfo.processInfo.environment["PARLEY_BUILDBOT_MUTATIONS"].flatMap(Int.init) ?? 2_000

    /// A random value, at most `depth` levels deep.
    static func value(_ rng: inout SplitMix, depth: Int = 3) -> MessagePack {
        switch Int.random(in: 0..<(depth > 0 ? 10 : 7), using: &rng) {
        case 0: return .nil
        case 1: return .bool(Bool.random(using: &rng))
        case 2: return .int([0, -1, 1, Int64.min, Int64.max, Int64.random(in: -1000...1000, using: &rng)].randomElement(using: &rng)!)
        case 3: return .uint([0, UInt64.max, UInt64(Int64.max) + 1].randomElement(using: &rng)!)
        case 4: return .double([0, -0.5, .nan, .infinity, -.infinity, 1e300, 3.25].randomElement(using: &rng)!)
        case 5: return .string(["", "rc", "stdout", "x", String(repeating: "ü", count: 100), "command-1"].randomElement(using: &rng)!)
        case 6: return .binary(Array(repeating: UInt8.random(in: 0...255, using: &rng), count: Int.random(in: 0...40, using: &rng)))
        case 7, 8: return .array((0..<Int.random(in: 0...4, using: &rng)).map { _ in Self.value(&rng, depth: depth - 1) })
        default:
            return .map((0..<Int.random(in: 0...3, using: &rng)).map { _ in (Self.value(&rng, depth: 0), Self.value(&rng, depth: depth - 1)) })
        }
    }

    /// One of the worker's messages, with some of its fields made up.
    static func message(_ rng: inout SplitMix, command: String) -> MessagePack {
        let ops = ["update", "complete", "update_upload_file_write", "update_upload_file_close", "update_upload_file_utime",
                   "update_read_file", "update_read_file_close", "update_upload_directory_write", "unknown_op", "response"]
        let op = ops.randomElement(using: &rng)!
        func maybe(_ real: MessagePack) -> MessagePack { Int.random(in: 0..<3, using: &rng) == 0 ? Self.value(&rng) : real }
        let updates: MessagePack = .array([
            .array([.string("stdout"), .array([.string("hello\n"), .array([.int(5)]), .array([.double(1.5)])])]),
            .array([.string("rc"), .int(0)]),
            .array([.string("stat"), .array((0..<10).map { .int($0) })]),
            .array([.string(["log", "files", "elapsed", "header", "failure_reason"].randomElement(using: &rng)!), Self.value(&rng)]),
        ])
        var fields: [(String, MessagePack)] = [("command_id", maybe(.string(command)))]
        switch op {
        case "update": fields.append(("args", maybe(updates)))
        case "complete": fields.append(("args", maybe(.nil)))
        case "update_upload_file_utime": fields += [("access_time", maybe(.double(1))), ("modified_time", maybe(.double(2)))]
        case "update_read_file": fields.append(("length", maybe(.int(100))))
        default: fields.append(("args", maybe(.binary([1, 2, 3]))))
        }
        let seq = maybe(.int(Int64.random(in: 0...5, using: &rng)))
        if op == "response" {
            return .map([(.string("op"), .string("response")), (.string("seq_number"), seq), (.string("result"), Self.value(&rng)),
                         (.string("is_exception"), maybe(.bool(false)))])
        }
        return .map([(.string("op"), maybe(.string(op))), (.string("seq_number"), seq)] + fields.map { (.string($0.0), $0.1) })
    }

    /// A transfer that takes everything and gives a few bytes.
    final class Sink: BuildbotTransfer, Sendable {
        func write(_ bytes: [UInt8]) async throws {}
        func closeWrite() async throws {}
        func setTimes(access: Double, modified: Double) async throws {}
        func read(length: Int) async throws -> [UInt8] { Array(repeating: 7, count: min(length, 16)) }
        func closeRead() async throws {}
    }

    @Test func madeUpAndMutatedMessagesAreReadOrRefusedAndTheConnectionEnds() async throws {
        var rng = SplitMix(seed: 0xB0B0)
        var read = 0
        var refused = 0
        var connections = 0
        var i = 0
        while i < Self.variants {
            // A connection running one command, for up to 50 messages.
            let channel = NIOAsyncTestingChannel()
            let connection = BuildbotConnection(worker: "w", channel: channel, callTimeout: .seconds(30), logger: Logger(label: "test"))
            let (id, events) = try await BuildbotConnectionEndTests.started(connection, channel, transfer: Sink())
            connections += 1
            for _ in 0..<50 where i < Self.variants {
                i += 1
                var message = Self.message(&rng, command: id)
                if Bool.random(using: &rng) {
                    // The same, its bytes mutated.
                    var bytes = message.encoded()
                    for _ in 0..<Int.random(in: 1...3, using: &rng) where !bytes.isEmpty {
                        let at = Int.random(in: 0..<bytes.count, using: &rng)
                        switch Int.random(in: 0..<3, using: &rng) {
                        case 0: bytes[at] ^= UInt8(1) << UInt8.random(in: 0..<8, using: &rng)
                        case 1: bytes.removeSubrange(at...)
                        default: bytes.insert(UInt8.random(in: 0...255, using: &rng), at: at)
                        }
                    }
                    guard let decoded = try? MessagePack.decode(bytes) else {
                        refused += 1
                        continue
                    }
                    message = decoded
                }
                do throws(BuildbotProtocolError) {
                    let parsed = try BuildbotMessage.parse(message)
                    if case .request("update", _, let body) = parsed {
                        // What the command's reader does with the updates.
                        do throws(BuildbotProtocolError) {
                            _ = try BuildbotUpdate.parse(body["args"] ?? .nil)
                        } catch {
                            #expect(!error.message.isEmpty)
                        }
                    }
                    try connection.received(parsed)
                    read += 1
                } catch {
                    #expect(!error.message.isEmpty, "variant \(i): refused without a reason")
                    refused += 1
                }
            }
            // The connection ends (as the front end ends it on a refusal): the command's
            // events end and closed() returns, whatever came before.
            connection.finish(reason: "the test is done with it")
            _ = await BuildbotConnectionEndTests.outcome(events)
            await connection.closed()
            _ = try? await channel.finish()
        }
        print("buildbot mutations: \(Self.variants) variants on \(connections) connections, \(read) taken, \(refused) refused")
        #expect(read > 0 && refused > 0)
    }
}
