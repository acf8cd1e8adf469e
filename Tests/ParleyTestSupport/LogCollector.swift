import Logging
import NIOConcurrencyHelpers

/// Collects log records so tests can check what a server logged.
public final class LogCollector: Sendable {
    public struct Record: Sendable {
        public var level: Logger.Level
        public var message: String
        public var metadata: String
    }

    private let records = NIOLockedValueBox<[Record]>([])
    public var all: [Record] { self.records.withLockedValue { $0 } }

    public init() {}

    public func logger(_ label: String, level: Logger.Level = .debug) -> Logger {
        var l = Logger(label: label) { _ in Handler(collector: self) }
        l.logLevel = level
        return l
    }

    func append(_ r: Record) { self.records.withLockedValue { $0.append(r) } }

    struct Handler: LogHandler {
        let collector: LogCollector
        var metadata: Logger.Metadata = [:]
        var logLevel: Logger.Level = .trace
        subscript(metadataKey key: String) -> Logger.Metadata.Value? {
            get { self.metadata[key] }
            set { self.metadata[key] = newValue }
        }
        func log(event: LogEvent) {
            let merged = self.metadata.merging(event.metadata ?? [:]) { $1 }
            self.collector.append(Record(level: event.level, message: "\(event.message)", metadata: "\(merged)"))
        }
    }
}
